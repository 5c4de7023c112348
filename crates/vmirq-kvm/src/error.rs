//! Errors from creating and running a KVM virtual machine.

use std::io;

use thiserror::Error;

/// Why a [`crate::KvmVm`] could not be created or started.
#[derive(Debug, Error)]
pub enum KvmError {
    #[error("the vCPUs are already running")]
    AlreadyRunning,
    #[error("cannot allocate guest memory: {0}")]
    GuestMemory(#[source] vm_memory::mmap::FromRangesError),
    #[error("KVM refused {op}: {source}")]
    Ioctl {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] io::Error),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(#[source] io::Error),
    #[error("cannot spawn the thread of vCPU {vcpu}: {source}")]
    SpawnThread {
        vcpu: usize,
        #[source]
        source: io::Error,
    },
    #[error("{requested} vCPUs requested; this KVM allows {max}")]
    TooManyVcpus { requested: usize, max: usize },
    #[error("vCPU {vcpu} was lost: its thread did not stop in time or could not be spawned")]
    VcpuLost { vcpu: usize },
}

impl KvmError {
    /// Wraps a failed ioctl.
    pub(crate) fn ioctl(op: &'static str, err: kvm_ioctls::Error) -> Self {
        KvmError::Ioctl {
            op,
            source: io::Error::from_raw_os_error(err.errno()),
        }
    }
}
