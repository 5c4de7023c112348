//! vCPU threads: the `KVM_RUN` loop and how `stop()` gets a thread out of it.
//!
//! Stopping: the stopper sets the shared stop flag, then sends `SIGRTMIN` to the thread. The
//! signal handler sets `immediate_exit` in that thread's `kvm_run`, so `KVM_RUN` returns
//! `EINTR` whether the signal lands inside the kernel (a halted vCPU) or just before the next
//! entry. The loop checks the flag before every entry. (Documentation/virt/kvm/api.rst,
//! "immediate_exit": the race-free way to kick a vCPU.)

use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{compiler_fence, AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, unblock_signal, Killable, SIGRTMIN};

use crate::backend::KvmBackend;
use crate::error::KvmError;

/// What the VMM does with the exits KVM hands to userspace. Called on the vCPU's own thread;
/// a slow handler delays only that vCPU.
pub trait VcpuExitHandler: Send + Sync {
    /// The guest wrote `data` to I/O `port`.
    fn pio_out(&self, vcpu: usize, port: u16, data: &[u8]);

    /// The guest reads I/O `port`; fill `data`. An absent device reads all-ones.
    fn pio_in(&self, vcpu: usize, port: u16, data: &mut [u8]) {
        let _ = (vcpu, port);
        data.fill(0xff);
    }

    /// The guest reads MMIO at `addr` (outside RAM and the in-kernel devices); fill `data`.
    fn mmio_read(&self, vcpu: usize, addr: u64, data: &mut [u8]);

    /// The guest wrote `data` to MMIO at `addr`.
    fn mmio_write(&self, vcpu: usize, addr: u64, data: &[u8]);

    /// The vCPU stopped for a reason other than `stop()` (shutdown, internal error, failed
    /// entry, an unexpected exit). Its thread ends after this call.
    fn vcpu_failed(&self, vcpu: usize, reason: String);
}

thread_local! {
    /// This thread's `kvm_run` mapping while it runs a vCPU; null otherwise. Read by the
    /// signal handler, so it must be a plain const-initialised cell (no lazy init, no drop).
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: a non-null KVM_RUN is this thread's live kvm_run mmap: it is set after the
        // VcpuFd (which owns the mapping) moved into this thread and cleared before the thread
        // gives the VcpuFd back. A volatile byte store is async-signal-safe.
        unsafe { ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler once per process.
pub(crate) fn install_kick_handler() -> Result<(), KvmError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let result = INSTALLED
        .get_or_init(|| register_signal_handler(SIGRTMIN(), kick_handler).map_err(|e| e.errno()));
    result.map_err(|errno| KvmError::SignalHandler(std::io::Error::from_raw_os_error(errno)))
}

/// Why a vCPU thread left its loop.
enum LoopEnd {
    Stopped,
    Failed(String),
}

/// One running vCPU thread; `join` returns the `VcpuFd` so the VM can be started again.
pub(crate) struct VcpuThread {
    pub(crate) index: usize,
    pub(crate) handle: JoinHandle<VcpuFd>,
}

pub(crate) struct RunContext {
    pub(crate) index: usize,
    pub(crate) backend: Arc<KvmBackend>,
    pub(crate) handler: Arc<dyn VcpuExitHandler>,
    pub(crate) stop: Arc<AtomicBool>,
}

/// The body of a vCPU thread.
pub(crate) fn run_vcpu(mut vcpu: VcpuFd, ctx: RunContext) -> VcpuFd {
    if let Err(e) = unblock_signal(SIGRTMIN()) {
        tracing::warn!(vcpu = ctx.index, "cannot unblock the kick signal: {e}");
    }
    KVM_RUN.with(|cell| cell.set(vcpu.get_kvm_run() as *mut kvm_run));
    // A previous stop() may have left immediate_exit set. Clearing it before the first flag
    // check keeps the protocol race-free: a kick after this store is seen by KVM_RUN, a kick
    // before it came after the flag was set and is seen by the check.
    vcpu.set_kvm_immediate_exit(0);
    compiler_fence(Ordering::SeqCst);
    let end = run_loop(&mut vcpu, &ctx);
    KVM_RUN.with(|cell| cell.set(ptr::null_mut()));
    compiler_fence(Ordering::SeqCst);
    if let LoopEnd::Failed(reason) = end {
        tracing::warn!(vcpu = ctx.index, "vCPU failed: {reason}");
        ctx.handler.vcpu_failed(ctx.index, reason);
    }
    vcpu
}

fn run_loop(vcpu: &mut VcpuFd, ctx: &RunContext) -> LoopEnd {
    let id = ctx.index;
    loop {
        if ctx.stop.load(Ordering::SeqCst) {
            return LoopEnd::Stopped;
        }
        let failure = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.handler.pio_out(id, port, data);
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                ctx.handler.pio_in(id, port, data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                ctx.handler.mmio_read(id, addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.handler.mmio_write(id, addr, data);
                None
            }
            Ok(VcpuExit::IoapicEoi(vector)) => {
                ctx.backend.ioapic_eoi(vector);
                None
            }
            // The in-kernel LAPIC handles HLT itself; an exit here only means "run again".
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) => None,
            Ok(VcpuExit::Shutdown) => Some("shutdown (triple fault)".to_string()),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(format!(
                "entry failed: hardware reason {reason:#x} on host CPU {cpu}"
            )),
            Ok(VcpuExit::InternalError) => Some(String::new()),
            Ok(VcpuExit::SystemEvent(kind, data)) => Some(format!("system event {kind} {data:x?}")),
            Ok(other) => Some(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked (or a stray signal): clear the kick and re-check the flag above.
                vcpu.set_kvm_immediate_exit(0);
                compiler_fence(Ordering::SeqCst);
                None
            }
            Err(e) => Some(format!("KVM_RUN failed: {e}")),
        };
        if let Some(mut reason) = failure {
            if reason.is_empty() {
                reason = internal_error(vcpu);
            }
            return LoopEnd::Failed(reason);
        }
    }
}

/// Describes a `KVM_EXIT_INTERNAL_ERROR` from the `kvm_run` it left behind.
fn internal_error(vcpu: &mut VcpuFd) -> String {
    let run = vcpu.get_kvm_run();
    // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is the union member
    // the kernel filled in.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    format!(
        "internal error: suberror {} data {:x?}",
        internal.suberror,
        &internal.data[..n]
    )
}

/// Stops `threads` (the flag must already be set) and returns each one's vCPU index and
/// `VcpuFd`, or `None` for a thread that did not leave KVM_RUN within `timeout` (it is
/// detached, never joined).
pub(crate) fn kick_and_join(
    threads: Vec<VcpuThread>,
    timeout: Duration,
) -> Vec<(usize, Option<VcpuFd>)> {
    let deadline = Instant::now() + timeout;
    threads
        .into_iter()
        .map(|t| {
            // Re-kick until the thread ends: a signal that arrives before the thread
            // published its kvm_run pointer is caught by the flag, but re-sending is cheap.
            while !t.handle.is_finished() {
                if Instant::now() >= deadline {
                    tracing::error!(vcpu = t.index, "vCPU thread did not stop; detaching it");
                    return (t.index, None);
                }
                // The thread has not been joined, so its pthread handle is still valid.
                if let Err(e) = t.handle.kill(SIGRTMIN()) {
                    tracing::warn!(vcpu = t.index, "cannot kick the vCPU thread: {e}");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            match t.handle.join() {
                Ok(vcpu) => (t.index, Some(vcpu)),
                Err(_) => {
                    tracing::error!(vcpu = t.index, "vCPU thread panicked");
                    (t.index, None)
                }
            }
        })
        .collect()
}
