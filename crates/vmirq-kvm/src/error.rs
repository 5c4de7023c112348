//! Errors from creating and running a KVM virtual machine.

use std::io;

use thiserror::Error;

/// Why a [`crate::KvmVm`] could not be created or started.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum KvmError {
    /// `start` was called while the vCPU threads run; `stop` them first.
    #[error("the vCPUs are already running")]
    AlreadyRunning,
    /// Saved vCPU state for another number of vCPUs.
    #[error("saved state of {saved} vCPUs cannot be loaded into a VM with {vcpus}")]
    VcpuCount {
        /// vCPUs saved.
        saved: usize,
        /// vCPUs of this VM.
        vcpus: usize,
    },
    /// The anonymous mapping for guest RAM could not be created.
    #[error("cannot allocate guest memory: {0}")]
    GuestMemory(#[source] vm_memory::mmap::FromRangesError),
    /// A KVM ioctl failed.
    #[error("KVM refused {op}: {source}")]
    Ioctl {
        /// The ioctl's name, e.g. `"KVM_CREATE_VM"`.
        op: &'static str,
        /// The errno it returned.
        #[source]
        source: io::Error,
    },
    /// The configuration asked for zero vCPUs.
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    /// `/dev/kvm` could not be opened (absent, or no permission).
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] io::Error),
    /// Registering the `SIGRTMIN` handler that kicks vCPUs out of `KVM_RUN` failed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(#[source] io::Error),
    /// A vCPU's thread could not be spawned; the threads already started were stopped.
    #[error("cannot spawn the thread of vCPU {vcpu}: {source}")]
    SpawnThread {
        /// Index of the vCPU.
        vcpu: usize,
        /// Why the spawn failed.
        #[source]
        source: io::Error,
    },
    /// More vCPUs were requested than `KVM_CAP_MAX_VCPUS` allows.
    #[error("{requested} vCPUs requested; this KVM allows {max}")]
    TooManyVcpus {
        /// vCPUs in the configuration.
        requested: usize,
        /// The most this KVM allows.
        max: usize,
    },
    /// A vCPU's fd was lost with its thread, so the VM cannot be started again.
    #[error("vCPU {vcpu} was lost: its thread did not stop in time or could not be spawned")]
    VcpuLost {
        /// Index of the vCPU.
        vcpu: usize,
    },
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
