//! [`KvmVm`]: a minimal KVM virtual machine for interrupt tests — guest RAM at GPA 0, an
//! in-kernel or split irqchip, and vCPUs that start in real mode. It is one user of
//! [`KvmBackend::new`], as any VMM that owns its VM is.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{
    kvm_enable_cap, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_segment, kvm_sregs,
    kvm_userspace_memory_region, kvm_vcpu_events, KVM_CAP_HALT_POLL, KVM_CAP_SPLIT_IRQCHIP,
    KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmirq::IrqchipMode;

use crate::backend::KvmBackend;
use crate::error::KvmError;
use crate::vcpu::{self, RunContext, VcpuExitHandler, VcpuThread};

/// How long `stop()` waits for vCPU threads before detaching them.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// What to build.
#[derive(Clone, Copy, Debug)]
pub struct KvmVmConfig {
    /// vCPUs to create.
    pub vcpus: usize,
    /// Bytes of guest RAM, mapped at GPA 0.
    pub mem_size: usize,
    /// Where the irqchip lives.
    pub irqchip: IrqchipMode,
    /// Upper bound on KVM's adaptive halt polling for this VM (KVM_CAP_HALT_POLL), in ns;
    /// `None` keeps the host's default (`kvm.halt_poll_ns`). A halted vCPU that polls wakes
    /// faster but spins a host CPU while it waits.
    pub halt_poll_ns: Option<u32>,
}

/// KVM_ENABLE_CAP on the VM with one argument.
fn enable_cap(vm: &VmFd, cap: u32, arg: u64, op: &'static str) -> Result<(), KvmError> {
    let mut request = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    request.args[0] = arg;
    vm.enable_cap(&request).map_err(|e| KvmError::ioctl(op, e))
}

/// Where each vCPU starts: real mode, CS = 0, IP = `ip`, SS:SP = 0:`stack_top(vcpu)`.
#[derive(Clone, Copy, Debug)]
pub struct RealModeBoot {
    /// Initial IP (CS = 0).
    pub ip: u16,
    /// Initial SP of each vCPU, by vCPU number.
    pub stack_top: fn(usize) -> u16,
}

/// One vCPU's state for an in-process migration ([`KvmVm::save_vcpus`]).
#[derive(Clone)]
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
    lapic: kvm_lapic_state,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("mp_state", &self.mp_state.mp_state)
            .finish()
    }
}

/// A KVM VM with its vCPUs. Dropping it stops and joins the vCPU threads.
///
/// vCPUs not running are held in `idle`; while running, each thread owns its `VcpuFd` and
/// returns it on join, so `start` may follow `stop`.
pub struct KvmVm {
    // Declared first: vCPU fds close before the backend (VM fd and memory) can go.
    idle: Vec<Option<VcpuFd>>,
    threads: Vec<VcpuThread>,
    stop: Arc<AtomicBool>,
    backend: Arc<KvmBackend>,
    vm: Arc<VmFd>,
    memory: GuestMemoryMmap,
}

impl KvmVm {
    /// Whether `/dev/kvm` can be opened.
    pub fn is_available() -> bool {
        // A /dev/kvm that opens but is not KVM (e.g. masked by a bind mount) does not count.
        Kvm::new().is_ok_and(|kvm| kvm.get_api_version() == kvm_bindings::KVM_API_VERSION as i32)
    }

    /// Creates the VM, its irqchip, guest RAM and `config.vcpus` vCPUs (not yet running).
    pub fn new(config: KvmVmConfig) -> Result<Self, KvmError> {
        if config.vcpus == 0 {
            return Err(KvmError::NoVcpus);
        }
        let kvm = Kvm::new().map_err(|e| KvmError::OpenKvm(e.into()))?;
        let max = kvm.get_max_vcpus();
        if config.vcpus > max {
            return Err(KvmError::TooManyVcpus {
                requested: config.vcpus,
                max,
            });
        }
        let vm = kvm
            .create_vm()
            .map_err(|e| KvmError::ioctl("KVM_CREATE_VM", e))?;
        // Only needed by VMX real-mode emulation; harmless elsewhere. Best effort: this host
        // has no VMX.
        if let Err(e) = vm.set_tss_address(0xfffb_d000) {
            tracing::debug!("KVM_SET_TSS_ADDR: {e}");
        }
        // The irqchip must exist before the first vCPU (api.rst: KVM_CREATE_IRQCHIP,
        // KVM_CAP_SPLIT_IRQCHIP).
        match config.irqchip {
            IrqchipMode::Kernel => vm
                .create_irq_chip()
                .map_err(|e| KvmError::ioctl("KVM_CREATE_IRQCHIP", e))?,
            IrqchipMode::Split { ioapic_pins } => enable_cap(
                &vm,
                KVM_CAP_SPLIT_IRQCHIP,
                ioapic_pins.into(),
                "KVM_ENABLE_CAP(SPLIT_IRQCHIP)",
            )?,
        }
        if let Some(ns) = config.halt_poll_ns {
            enable_cap(
                &vm,
                KVM_CAP_HALT_POLL,
                ns.into(),
                "KVM_ENABLE_CAP(HALT_POLL)",
            )?;
        }

        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), config.mem_size)])
            .map_err(KvmError::GuestMemory)?;
        for (slot, region) in memory.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the mapping is `region.len()` bytes at `as_ptr()`, and it lives as long
            // as the VM fd: KvmVm's drop keeps it mapped while anything else holds the VM.
            unsafe { vm.set_user_memory_region(region_desc) }
                .map_err(|e| KvmError::ioctl("KVM_SET_USER_MEMORY_REGION", e))?;
        }

        let mut idle = Vec::with_capacity(config.vcpus);
        for id in 0..config.vcpus {
            let vcpu = vm
                .create_vcpu(id as u64)
                .map_err(|e| KvmError::ioctl("KVM_CREATE_VCPU", e))?;
            idle.push(Some(vcpu));
        }
        let vm = Arc::new(vm);
        let backend = Arc::new(KvmBackend::new(Arc::clone(&vm), config.irqchip));
        Ok(Self {
            idle,
            threads: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            backend,
            vm,
            memory,
        })
    }

    /// The interrupt backend of this VM, for `vmirq`.
    pub fn backend(&self) -> Arc<KvmBackend> {
        Arc::clone(&self.backend)
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// vCPUs of the VM.
    pub fn vcpus(&self) -> usize {
        self.idle.len()
    }

    /// Whether vCPU threads are running.
    pub fn is_running(&self) -> bool {
        !self.threads.is_empty()
    }

    /// Puts every vCPU in real mode at `boot` and starts one `KVM_RUN` thread per vCPU.
    ///
    /// Segments: CS base 0 limit 0xFFFF; DS/ES/FS/GS/SS base 0 limit 4 GiB with granularity
    /// set ("unreal mode"), so 32-bit addresses reach the LAPIC and IOAPIC. Every vCPU is made
    /// runnable directly: APs do not wait for INIT/SIPI.
    pub fn start(
        &mut self,
        boot: &RealModeBoot,
        handler: Arc<dyn VcpuExitHandler>,
    ) -> Result<(), KvmError> {
        if self.is_running() {
            return Err(KvmError::AlreadyRunning);
        }
        for (id, slot) in self.idle.iter().enumerate() {
            // A vCPU lost to a thread that never stopped cannot run again.
            let vcpu = slot.as_ref().ok_or(KvmError::VcpuLost { vcpu: id })?;
            set_real_mode(vcpu, boot.ip, (boot.stack_top)(id))?;
        }
        self.run(handler)
    }

    /// Starts one `KVM_RUN` thread per vCPU from the state the vCPUs are in (after
    /// [`KvmVm::stop`], or [`KvmVm::restore_vcpus`] on a migration's target).
    pub fn resume(&mut self, handler: Arc<dyn VcpuExitHandler>) -> Result<(), KvmError> {
        if self.is_running() {
            return Err(KvmError::AlreadyRunning);
        }
        if let Some(id) = self.idle.iter().position(Option::is_none) {
            return Err(KvmError::VcpuLost { vcpu: id });
        }
        self.run(handler)
    }

    /// Each stopped vCPU's state (registers, segments, FPU, LAPIC, MP state and pending
    /// events), for a migration. The vCPUs must be stopped.
    pub fn save_vcpus(&self) -> Result<Vec<VcpuState>, KvmError> {
        if self.is_running() {
            return Err(KvmError::AlreadyRunning);
        }
        let ioctl = |op| move |e| KvmError::ioctl(op, e);
        self.idle
            .iter()
            .enumerate()
            .map(|(id, slot)| {
                let vcpu = slot.as_ref().ok_or(KvmError::VcpuLost { vcpu: id })?;
                Ok(VcpuState {
                    regs: vcpu.get_regs().map_err(ioctl("KVM_GET_REGS"))?,
                    sregs: vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?,
                    fpu: vcpu.get_fpu().map_err(ioctl("KVM_GET_FPU"))?,
                    lapic: vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?,
                    mp_state: vcpu.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?,
                    events: vcpu
                        .get_vcpu_events()
                        .map_err(ioctl("KVM_GET_VCPU_EVENTS"))?,
                })
            })
            .collect()
    }

    /// Loads [`KvmVm::save_vcpus`]'s state into this VM's stopped vCPUs (same count), in
    /// KVM's order: segments before the LAPIC (its base MSR), pending events last.
    pub fn restore_vcpus(&self, states: &[VcpuState]) -> Result<(), KvmError> {
        if self.is_running() {
            return Err(KvmError::AlreadyRunning);
        }
        if states.len() != self.idle.len() {
            return Err(KvmError::VcpuCount {
                saved: states.len(),
                vcpus: self.idle.len(),
            });
        }
        let ioctl = |op| move |e| KvmError::ioctl(op, e);
        for (id, (slot, s)) in self.idle.iter().zip(states).enumerate() {
            let vcpu = slot.as_ref().ok_or(KvmError::VcpuLost { vcpu: id })?;
            vcpu.set_sregs(&s.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
            vcpu.set_regs(&s.regs).map_err(ioctl("KVM_SET_REGS"))?;
            vcpu.set_fpu(&s.fpu).map_err(ioctl("KVM_SET_FPU"))?;
            vcpu.set_lapic(&s.lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
            vcpu.set_mp_state(s.mp_state)
                .map_err(ioctl("KVM_SET_MP_STATE"))?;
            vcpu.set_vcpu_events(&s.events)
                .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
        }
        Ok(())
    }

    fn run(&mut self, handler: Arc<dyn VcpuExitHandler>) -> Result<(), KvmError> {
        let vcpus = self.vcpus();
        vcpu::install_kick_handler()?;

        self.stop.store(false, Ordering::SeqCst);
        for id in 0..vcpus {
            let Some(fd) = self.idle[id].take() else {
                continue;
            };
            let ctx = RunContext {
                index: id,
                backend: Arc::clone(&self.backend),
                handler: Arc::clone(&handler),
                stop: Arc::clone(&self.stop),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu::run_vcpu(fd, ctx));
            match spawned {
                Ok(handle) => self.threads.push(VcpuThread { index: id, handle }),
                Err(source) => {
                    // The closure (and the VcpuFd in it) is gone; stop the others cleanly.
                    self.stop();
                    return Err(KvmError::SpawnThread { vcpu: id, source });
                }
            }
        }
        Ok(())
    }

    /// Stops and joins every vCPU thread. Never blocks longer than a few seconds, even when a
    /// vCPU is halted inside the kernel; a thread that does not stop in time is detached.
    pub fn stop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        self.stop.store(true, Ordering::SeqCst);
        let threads = std::mem::take(&mut self.threads);
        let returned = vcpu::kick_and_join(threads, STOP_TIMEOUT);
        for (index, fd) in returned {
            self.idle[index] = fd;
        }
    }
}

impl Drop for KvmVm {
    fn drop(&mut self) {
        self.stop();
        // Guest RAM must not be unmapped while the VM can still run or is still open: KVM's
        // memslots point at it. A vCPU thread that never stopped, or a backend (and so the VM
        // fd) kept alive by its users, keeps the mapping for the rest of the process.
        let lost_vcpu = self.idle.iter().any(Option::is_none);
        let vm_shared = Arc::strong_count(&self.backend) > 1 || Arc::strong_count(&self.vm) > 2;
        if lost_vcpu || vm_shared {
            std::mem::forget(self.memory.clone());
        }
    }
}

/// Puts `vcpu` in real mode at 0:`ip` with SS:SP = 0:`sp`, unreal data segments (base 0,
/// 4 GiB limit, so 32-bit addresses reach the LAPIC and IOAPIC), runnable (APs skip
/// INIT/SIPI): the CPU state vmirq's real-mode test guests start in, for any VMM that runs one.
pub fn set_real_mode(vcpu: &VcpuFd, ip: u16, sp: u16) -> Result<(), KvmError> {
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| KvmError::ioctl("KVM_GET_SREGS", e))?;
    sregs.cs = kvm_segment {
        base: 0,
        limit: 0xffff,
        selector: 0,
        ..sregs.cs
    };
    let unreal = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0,
        g: 1,
        ..sregs.ds
    };
    sregs.ds = unreal;
    sregs.es = unreal;
    sregs.fs = unreal;
    sregs.gs = unreal;
    sregs.ss = unreal;
    // Real-mode IVT at 0.
    sregs.idt.base = 0;
    sregs.idt.limit = 0x3ff;
    sregs.cr0 &= !1; // PE off
    vcpu.set_sregs(&sregs)
        .map_err(|e| KvmError::ioctl("KVM_SET_SREGS", e))?;

    let mut regs = vcpu
        .get_regs()
        .map_err(|e| KvmError::ioctl("KVM_GET_REGS", e))?;
    regs.rip = u64::from(ip);
    regs.rsp = u64::from(sp);
    regs.rflags = 2; // bit 1 is reserved-one; IF clear until the guest's sti
    vcpu.set_regs(&regs)
        .map_err(|e| KvmError::ioctl("KVM_SET_REGS", e))?;

    // APs start in wait-for-SIPI, and a vCPU stopped while halted stays halted: make every
    // vCPU runnable from the registers set above.
    vcpu.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .map_err(|e| KvmError::ioctl("KVM_SET_MP_STATE", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Instant;

    use vm_memory::Bytes;

    use super::*;

    const CODE: u64 = 0x1000;

    #[derive(Default)]
    struct Log {
        pio: Mutex<Vec<(usize, u16, Vec<u8>)>>,
        failed: Mutex<Vec<(usize, String)>>,
    }

    impl VcpuExitHandler for Log {
        fn pio_out(&self, vcpu: usize, port: u16, data: &[u8]) {
            self.pio.lock().unwrap().push((vcpu, port, data.to_vec()));
        }
        fn mmio_read(&self, _: usize, _: u64, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn mmio_write(&self, _: usize, _: u64, _: &[u8]) {}
        fn vcpu_failed(&self, vcpu: usize, reason: String) {
            self.failed.lock().unwrap().push((vcpu, reason));
        }
    }

    /// A VM with `code` at 0x1000, or None without /dev/kvm.
    fn vm_with(vcpus: usize, code: &[u8]) -> Option<KvmVm> {
        if !crate::kvm_test_gate("vm::vm_with") {
            return None;
        }
        let config = KvmVmConfig {
            vcpus,
            mem_size: 0x10000,
            irqchip: IrqchipMode::Kernel,
            halt_poll_ns: None,
        };
        let vm = KvmVm::new(config).unwrap();
        vm.memory().write_slice(code, GuestAddress(CODE)).unwrap();
        Some(vm)
    }

    fn boot() -> RealModeBoot {
        RealModeBoot {
            ip: CODE as u16,
            stack_top: |vcpu| 0xF000 - vcpu as u16 * 0x800,
        }
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn every_vcpu_runs_in_real_mode_and_reaches_the_handler() {
        // mov al, 0x5a; out 0x80, al; cli; hlt; jmp $-1
        let Some(mut vm) = vm_with(2, &[0xB0, 0x5A, 0xE6, 0x80, 0xFA, 0xF4, 0xEB, 0xFD]) else {
            return;
        };
        let log = Arc::new(Log::default());
        vm.start(&boot(), log.clone()).unwrap();
        wait_until("both port writes", || log.pio.lock().unwrap().len() == 2);
        vm.stop();
        let mut pio = log.pio.lock().unwrap().clone();
        pio.sort();
        assert_eq!(pio, vec![(0, 0x80, vec![0x5A]), (1, 0x80, vec![0x5A])]);
        assert!(log.failed.lock().unwrap().is_empty());
    }

    #[test]
    fn stop_returns_while_vcpus_halt_with_interrupts_off_and_start_works_again() {
        // out 0x80, al; cli; hlt; jmp $-1
        let Some(mut vm) = vm_with(2, &[0xE6, 0x80, 0xFA, 0xF4, 0xEB, 0xFD]) else {
            return;
        };
        let log = Arc::new(Log::default());
        for round in 1..=2 {
            vm.start(&boot(), log.clone()).unwrap();
            assert!(matches!(
                vm.start(&boot(), log.clone()),
                Err(KvmError::AlreadyRunning)
            ));
            wait_until("vCPUs to halt", || {
                log.pio.lock().unwrap().len() == 2 * round
            });
            let t0 = Instant::now();
            vm.stop();
            assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
            assert!(!vm.is_running());
        }
        assert!(log.failed.lock().unwrap().is_empty());
    }

    #[test]
    fn a_vcpu_failure_is_reported_to_the_handler() {
        // rdrand eax; out 0x80, al; cli; hlt. This host's KVM emulates every guest
        // instruction and has no rdrand: KVM_EXIT_INTERNAL_ERROR (emulation failure).
        let code = [0x0F, 0xC7, 0xF0, 0xE6, 0x80, 0xFA, 0xF4];
        let Some(mut vm) = vm_with(1, &code) else {
            return;
        };
        let log = Arc::new(Log::default());
        vm.start(&boot(), log.clone()).unwrap();
        wait_until("vcpu_failed or the port write", || {
            !log.failed.lock().unwrap().is_empty() || !log.pio.lock().unwrap().is_empty()
        });
        vm.stop();
        if !log.pio.lock().unwrap().is_empty() {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "note: this KVM executes rdrand natively; the emulation-failure path is not exercised");
            return;
        }
        let failed = log.failed.lock().unwrap();
        assert_eq!(failed[0].0, 0);
        assert!(failed[0].1.starts_with("internal error"), "{}", failed[0].1);
    }

    #[test]
    fn bad_configurations_are_refused() {
        if !crate::kvm_test_gate("vm::bad_configurations_are_refused") {
            return;
        }
        let config = |vcpus| KvmVmConfig {
            vcpus,
            mem_size: 0x10000,
            irqchip: IrqchipMode::Kernel,
            halt_poll_ns: None,
        };
        assert!(matches!(KvmVm::new(config(0)), Err(KvmError::NoVcpus)));
        assert!(matches!(
            KvmVm::new(config(usize::MAX)),
            Err(KvmError::TooManyVcpus { .. })
        ));
    }
}
