//! The real-mode test guest: assembled with iced-x86 (16-bit), loaded into guest RAM by the
//! host, and read back through its interrupt counters.
//!
//! Every vCPU runs the same code: mask both PICs, software-enable its LAPIC, run the boot
//! MMIO script (APIC ID 0 only), report ready on [`READY_PORT`], then `sti; hlt` forever.
//! Each vector has a stub that saves EAX, loads the vector and jumps to one common handler,
//! which counts the interrupt in the [`COUNTERS_ADDR`] block, reports it on [`ISR_PORT`] and
//! EOIs the LAPIC. The stub of [`XEN_UPCALL_VECTOR`] first runs the Linux-like Xen 2-level
//! event channel consumer on the compat `shared_info` page ([`XEN_SHARED_INFO`]), counting each
//! port it acks at [`XEN_PORT_COUNTERS`], then joins the common handler. Runtime MMIO scripts
//! can issue hypercalls: the guest fills its mailbox ([`HYPERCALL_MAILBOX`]) and rings
//! [`XEN_DOORBELL_PORT`]; the host answers before the `out` completes. 32-bit operands and addresses make iced emit the 0x66/0x67 prefixes; the
//! 4 GiB data segment limits the host sets make the 32-bit addresses legal in real mode.

use std::sync::atomic::{AtomicU32, Ordering};

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;
use thiserror::Error;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap, VolatileMemory,
};
use vmirq_kvm::RealModeBoot;

use crate::layout::*;

/// Errors loading the guest or reading its state.
#[derive(Debug, Error)]
pub enum GuestError {
    #[error("guest memory access failed: {0}")]
    Memory(#[from] GuestMemoryError),
    #[error("cannot allocate guest RAM: {0}")]
    Ram(String),
    #[error("the boot MMIO script has {0} entries; at most {MMIO_SCRIPT_MAX} fit")]
    ScriptTooLong(usize),
    #[error("vCPU {vcpu} is beyond the guest layout's {MAX_VCPUS} vCPUs")]
    VcpuOutOfRange { vcpu: usize },
}

/// The assembled guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestImage {
    /// Machine code, loaded at `code_addr`.
    pub code: Vec<u8>,
    pub code_addr: u64,
    /// IP of the boot entry point (CS = 0).
    pub entry_ip: u16,
    /// IP of each vector's stub (CS = 0): what the IVT holds.
    pub stub_offsets: [u16; VECTORS],
}

impl GuestImage {
    /// Where `vcpus` vCPUs start: the entry point, each on its own stack. Refuses more vCPUs
    /// than the layout has stacks and counters for.
    pub fn boot(&self, vcpus: usize) -> Result<RealModeBoot, GuestError> {
        if vcpus > MAX_VCPUS {
            return Err(GuestError::VcpuOutOfRange { vcpu: vcpus - 1 });
        }
        Ok(RealModeBoot {
            ip: self.entry_ip,
            stack_top,
        })
    }
}

/// IPs of a few instructions, so tests can check their encoding.
#[derive(Debug, Default)]
#[cfg_attr(not(test), allow(dead_code))]
struct Marks {
    svr_write: u16,
    script_write: u16,
    counter_inc: u16,
    isr_out: u16,
    iret: u16,
    hcall_out: u16,
    upcall_clear: u16,
    sel_xchg: u16,
    pending_btr: u16,
    port_inc: u16,
    common: u16,
    xen_upcall: u16,
}

/// Assembles the guest.
pub fn build() -> GuestImage {
    // The program is fixed; failing to assemble it is a bug in this file, not a runtime state.
    match assemble() {
        Ok((image, _)) => image,
        Err(AsmError(why)) => panic!("the fixed guest program does not assemble: {why}"),
    }
}

/// Why the fixed program failed to assemble (a bug in this file).
#[derive(Debug)]
struct AsmError(String);

impl From<IcedError> for AsmError {
    fn from(e: IcedError) -> Self {
        AsmError(e.to_string())
    }
}

/// FIFO event word bits (xen/include/public/event_channel.h).
const FIFO_MASKED: u32 = 1 << 30;
const FIFO_LINKED: u32 = 1 << 29;
const FIFO_LINK: u32 = (1 << 17) - 1;

fn ip_of(result: &CodeAssemblerResult, label: &CodeLabel) -> Result<u16, AsmError> {
    let ip = result.label_ip(label)?;
    u16::try_from(ip).map_err(|_| AsmError(format!("label at {ip:#x} is beyond 64 KiB")))
}

fn assemble() -> Result<(GuestImage, Marks), AsmError> {
    let mut a = CodeAssembler::new(16)?;
    let mut entry = a.create_label();
    let mut script_loop = a.create_label();
    let mut script_count_ok = a.create_label();
    let mut ready = a.create_label();
    let mut halt_loop = a.create_label();
    let mut common = a.create_label();
    let mut id_ok = a.create_label();
    let mut svr_write = a.create_label();
    let mut script_write = a.create_label();
    let mut counter_inc = a.create_label();
    let mut isr_out = a.create_label();
    let mut iret = a.create_label();
    let mut run_script = a.create_label();
    let mut script_read = a.create_label();
    let mut script_next = a.create_label();
    let mut script_done = a.create_label();
    let mut idle = a.create_label();
    let mut script_hcall = a.create_label();
    let mut hcall_id_ok = a.create_label();
    let mut hcall_out = a.create_label();
    let mut xen_upcall = a.create_label();
    let mut xen_id_ok = a.create_label();
    let mut xen_pass = a.create_label();
    let mut xen_sel_loop = a.create_label();
    let mut xen_bit_loop = a.create_label();
    let mut xen_sel_done = a.create_label();
    let mut xen_done = a.create_label();
    let mut sel_xchg = a.create_label();
    let mut pending_btr = a.create_label();
    let mut port_inc = a.create_label();
    let mut xen_legacy = a.create_label();
    let mut xen_info_ok = a.create_label();
    let mut xen_fifo = a.create_label();
    let mut xen_fifo_pre = a.create_label();
    let mut fifo_legacy = a.create_label();
    let mut fifo_counted = a.create_label();
    let mut fifo_pass = a.create_label();
    let mut fifo_ready_xchg = a.create_label();
    let mut fifo_loop = a.create_label();
    let mut fifo_have_head = a.create_label();
    let mut fifo_unlink = a.create_label();
    let mut fifo_cmpxchg = a.create_label();
    let mut fifo_handle = a.create_label();
    let mut fifo_pending_btr = a.create_label();
    let mut fifo_first = a.create_label();
    let mut fifo_no_counter = a.create_label();
    let mut fifo_no_log = a.create_label();
    let mut fifo_next = a.create_label();
    let mut fifo_budget = a.create_label();
    let mut fifo_pass_done = a.create_label();

    // --- Boot, identical on every vCPU.
    a.set_label(&mut entry)?;
    a.cli()?;
    a.mov(al, 0xffu32)?;
    a.out(u32::from(PIC_MASTER_DATA_PORT), al)?;
    a.out(u32::from(PIC_SLAVE_DATA_PORT), al)?;
    a.mov(ebx, LAPIC_SVR)?;
    a.set_label(&mut svr_write)?;
    a.mov(dword_ptr(ebx), LAPIC_SVR_ENABLE)?;
    a.mov(ebx, LAPIC_TPR)?;
    a.mov(dword_ptr(ebx), 0u32)?;
    a.mov(ebx, LAPIC_ID)?;
    a.mov(ebp, dword_ptr(ebx))?;
    a.shr(ebp, 24u32)?;
    a.test(ebp, ebp)?;
    a.jnz(ready)?;

    // APIC ID 0: the boot MMIO script.
    a.call(run_script)?;

    a.set_label(&mut ready)?;
    a.mov(eax, ebp)?;
    a.mov(dx, u32::from(READY_PORT))?;
    a.out(dx, al)?;
    // The idle loop. vCPU 0 also serves runtime MMIO commands: with interrupts off it checks
    // for a new command; if none, `sti; hlt` (sti's one-instruction shadow makes the pair
    // atomic, so a doorbell arriving after the check still wakes the hlt).
    a.set_label(&mut halt_loop)?;
    a.cli()?;
    a.test(ebp, ebp)?;
    a.jnz(idle)?;
    a.mov(ebx, CMD_SEQ_ADDR as u32)?;
    a.mov(eax, dword_ptr(ebx))?;
    a.mov(ebx, CMD_DONE_ADDR as u32)?;
    a.cmp(eax, dword_ptr(ebx))?;
    a.je(idle)?;
    a.sti()?;
    a.push(eax)?;
    a.call(run_script)?;
    a.pop(eax)?;
    a.mov(ebx, CMD_DONE_ADDR as u32)?;
    a.mov(dword_ptr(ebx), eax)?;
    a.mov(dx, u32::from(DONE_PORT))?;
    a.out(dx, al)?;
    a.jmp(halt_loop)?;
    a.set_label(&mut idle)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(halt_loop)?;

    // --- The MMIO script: 32-bit accesses of (address, value) pairs; an address with bit 0
    // set is a read of (address & !1), whose result replaces the entry's value; an address
    // whose low two bits are 0b10 is a hypercall (cmd = value, args_gpa = address & !3) whose
    // result replaces the entry's value. The count is guest memory the host wrote, but clamp
    // it anyway so a corrupt count cannot run off the script area. On entry EBP = APIC ID.
    // Uses EAX, EBX, ECX, EDX, ESI, EDI (the ISR preserves what it touches).
    a.set_label(&mut run_script)?;
    a.mov(ebx, MMIO_SCRIPT_COUNT_ADDR as u32)?;
    a.mov(ecx, dword_ptr(ebx))?;
    a.cmp(ecx, MMIO_SCRIPT_MAX as u32)?;
    a.jbe(script_count_ok)?;
    a.mov(ecx, MMIO_SCRIPT_MAX as u32)?;
    a.set_label(&mut script_count_ok)?;
    a.mov(esi, MMIO_SCRIPT_ENTRIES_ADDR as u32)?;
    a.set_label(&mut script_loop)?;
    a.test(ecx, ecx)?;
    a.jz(script_done)?;
    a.mov(ebx, dword_ptr(esi))?;
    a.mov(eax, dword_ptr(esi + 4))?;
    a.test(bl, 1u32)?;
    a.jnz(script_read)?;
    a.test(bl, 2u32)?;
    a.jnz(script_hcall)?;
    a.set_label(&mut script_write)?;
    a.mov(dword_ptr(ebx), eax)?;
    a.jmp(script_next)?;
    a.set_label(&mut script_read)?;
    a.and(ebx, !1u32)?;
    a.mov(eax, dword_ptr(ebx))?;
    a.mov(dword_ptr(esi + 4), eax)?;
    a.jmp(script_next)?;
    // A hypercall: fill this vCPU's mailbox (result preset to -ENOSYS), ring the doorbell with
    // AL = APIC ID; the host ran the hypercall and wrote the result when the `out` returns.
    a.set_label(&mut script_hcall)?;
    a.and(ebx, !3u32)?;
    a.mov(edi, ebp)?;
    a.cmp(edi, (MAX_VCPUS - 1) as u32)?;
    a.jbe(hcall_id_ok)?;
    a.mov(edi, (MAX_VCPUS - 1) as u32)?;
    a.set_label(&mut hcall_id_ok)?;
    a.mov(edx, edi)?;
    a.shl(edi, HYPERCALL_MAILBOX_SIZE.trailing_zeros())?;
    a.add(edi, HYPERCALL_MAILBOX as u32)?;
    a.mov(dword_ptr(edi + HYPERCALL_CMD_OFFSET as i32), eax)?;
    a.mov(dword_ptr(edi + HYPERCALL_ARGS_OFFSET as i32), ebx)?;
    a.mov(
        dword_ptr(edi + HYPERCALL_RESULT_OFFSET as i32),
        HYPERCALL_ENOSYS as u32,
    )?;
    a.mov(eax, edx)?;
    a.mov(dx, u32::from(XEN_DOORBELL_PORT))?;
    a.set_label(&mut hcall_out)?;
    a.out(dx, al)?;
    a.mov(eax, dword_ptr(edi + HYPERCALL_RESULT_OFFSET as i32))?;
    a.mov(dword_ptr(esi + 4), eax)?;
    a.set_label(&mut script_next)?;
    a.add(esi, MMIO_SCRIPT_ENTRY_SIZE as u32)?;
    a.dec(ecx)?;
    a.jmp(script_loop)?;
    a.set_label(&mut script_done)?;
    a.ret()?;

    // --- Common interrupt handler. On entry: AL = vector, EAX saved by the stub, the CPU
    // pushed FLAGS, CS, IP.
    a.set_label(&mut common)?;
    a.push(ebx)?;
    a.push(edx)?;
    a.movzx(eax, al)?;
    a.mov(ebx, LAPIC_ID)?;
    a.mov(ebx, dword_ptr(ebx))?;
    a.shr(ebx, 24u32)?;
    // Clamp the APIC ID so a vCPU with an unexpected ID cannot count outside the block.
    a.cmp(ebx, (MAX_VCPUS - 1) as u32)?;
    a.jbe(id_ok)?;
    a.mov(ebx, (MAX_VCPUS - 1) as u32)?;
    a.set_label(&mut id_ok)?;
    a.shl(ebx, COUNTERS_PER_VCPU.trailing_zeros())?;
    a.set_label(&mut counter_inc)?;
    a.lock()
        .inc(dword_ptr(ebx + eax * 4 + COUNTERS_ADDR as i32))?;
    a.mov(dx, u32::from(ISR_PORT))?;
    a.set_label(&mut isr_out)?;
    a.out(dx, al)?;
    a.mov(ebx, LAPIC_EOI)?;
    a.mov(dword_ptr(ebx), 0u32)?;
    a.pop(edx)?;
    a.pop(ebx)?;
    a.pop(eax)?;
    a.set_label(&mut iret)?;
    a.iret()?;

    // --- The Xen 2-level event channel consumer, as Linux's __xen_evtchn_do_upcall and
    // evtchn_2l_handle_events run it (drivers/xen/events/events_{base,2l}.c), in the compat
    // layout (xen/include/public/xen.h): clear upcall_pending, take the selector with xchg,
    // and for each selected word ack (lock btr) every pending unmasked port and count it;
    // repeat while the host set upcall_pending again, at most XEN_CONSUMER_MAX_PASSES times.
    // Masked ports keep their pending bit (the host re-raises on unmask). Entered from the
    // upcall vector's stub with AL = vector and EAX saved; preserves every register and
    // joins the common handler, which counts the vector, reports it, EOIs and returns.
    // Registers: EBX = vcpu_info, EBP = passes left, ESI = selector, ECX = word index,
    // EDI = word's deliverable bits, EDX = bit index, EAX = port.
    a.set_label(&mut xen_upcall)?;
    a.push(eax)?;
    a.push(ebx)?;
    a.push(ecx)?;
    a.push(edx)?;
    a.push(esi)?;
    a.push(edi)?;
    a.push(ebp)?;
    a.mov(ebx, LAPIC_ID)?;
    a.mov(ebx, dword_ptr(ebx))?;
    a.shr(ebx, 24u32)?;
    a.cmp(ebx, (MAX_VCPUS - 1) as u32)?;
    a.jbe(xen_id_ok)?;
    a.mov(ebx, (MAX_VCPUS - 1) as u32)?;
    a.set_label(&mut xen_id_ok)?;
    a.mov(eax, XEN_FIFO_FLAG as u32)?;
    a.cmp(dword_ptr(eax), 0u32)?;
    a.jne(xen_fifo_pre)?;
    // APIC IDs from 32 on have no slot in shared_info: theirs are at XEN_VCPU_INFO_EXT.
    a.cmp(ebx, 32u32)?;
    a.jb(xen_legacy)?;
    a.sub(ebx, 32u32)?;
    a.shl(ebx, XEN_VCPU_INFO_SIZE.trailing_zeros())?;
    a.add(ebx, XEN_VCPU_INFO_EXT as u32)?;
    a.jmp(xen_info_ok)?;
    a.set_label(&mut xen_legacy)?;
    a.shl(ebx, XEN_VCPU_INFO_SIZE.trailing_zeros())?;
    a.add(ebx, XEN_SHARED_INFO as u32)?;
    a.set_label(&mut xen_info_ok)?;
    a.mov(ebp, XEN_CONSUMER_MAX_PASSES)?;
    let pending = (XEN_SHARED_INFO + XEN_EVTCHN_PENDING_OFFSET) as i32;
    let mask = (XEN_SHARED_INFO + XEN_EVTCHN_MASK_OFFSET) as i32;
    // Each pass starts with the upcall_pending store (marked as upcall_clear for the tests).
    a.set_label(&mut xen_pass)?;
    a.mov(byte_ptr(ebx + XEN_UPCALL_PENDING_OFFSET as i32), 0u32)?;
    a.xor(esi, esi)?;
    // xchg with memory is atomic (implicitly locked).
    a.set_label(&mut sel_xchg)?;
    a.xchg(dword_ptr(ebx + XEN_PENDING_SEL_OFFSET as i32), esi)?;
    a.set_label(&mut xen_sel_loop)?;
    a.bsf(ecx, esi)?;
    a.jz(xen_sel_done)?;
    a.btr(esi, ecx)?;
    a.mov(edi, dword_ptr(ecx * 4 + mask))?;
    a.not(edi)?;
    a.and(edi, dword_ptr(ecx * 4 + pending))?;
    a.set_label(&mut xen_bit_loop)?;
    a.bsf(edx, edi)?;
    a.jz(xen_sel_loop)?;
    a.btr(edi, edx)?;
    // Ack: clear the pending bit before handling, as Linux does. Only the vCPU whose btr
    // cleared it handles the port (CF = the old bit): with many vCPUs two may scan one word
    // (Linux keeps them apart with its per-CPU masks).
    a.set_label(&mut pending_btr)?;
    a.lock().btr(dword_ptr(ecx * 4 + pending), edx)?;
    a.jnc(xen_bit_loop)?;
    a.mov(eax, ecx)?;
    a.shl(eax, 5u32)?;
    a.add(eax, edx)?;
    a.set_label(&mut port_inc)?;
    a.lock()
        .inc(dword_ptr(eax * 4 + XEN_PORT_COUNTERS as i32))?;
    a.jmp(xen_bit_loop)?;
    a.set_label(&mut xen_sel_done)?;
    a.cmp(byte_ptr(ebx + XEN_UPCALL_PENDING_OFFSET as i32), 0u32)?;
    a.je(xen_done)?;
    a.dec(ebp)?;
    a.jnz(xen_pass)?;
    a.set_label(&mut xen_done)?;
    a.pop(ebp)?;
    a.pop(edi)?;
    a.pop(esi)?;
    a.pop(edx)?;
    a.pop(ecx)?;
    a.pop(ebx)?;
    a.pop(eax)?;
    a.jmp(common)?;

    // --- The Xen FIFO consumer, as Linux's __evtchn_fifo_handle_events and consume_one_event
    // run it (drivers/xen/events/events_fifo.c): clear upcall_pending, take READY with xchg,
    // and while any priority is ready, take the highest (bsf): its head is the consumer's own
    // copy, or the control block's HEAD when that copy is 0; unlink the head (lock cmpxchg
    // clearing LINKED and LINK; the old LINK is the next head, 0 empties the queue), and if
    // the word is not MASKED, ack it with lock btr PENDING and count it only if that took it;
    // then OR in READY again. Repeats while upcall_pending was set again. Entered with EBX =
    // APIC ID and the registers saved. Registers: ESI = control block, EDI = head copies,
    // EDX = ready priorities, ECX = priority, EBX = event word, EBP = budget, EAX = scratch.
    // Counting (the guest runs emulated here, so it is kept short): the port counter below
    // 1024; with bit 1 of XEN_FIFO_FLAG a bit in XEN_FIFO_SEEN (one already set counts in
    // XEN_FIFO_DUPS) and the port appended to XEN_FIFO_LOG; then XEN_FIFO_TOTAL.
    a.set_label(&mut xen_fifo_pre)?;
    a.mov(esi, ebx)?;
    a.shl(esi, XEN_FIFO_CONTROL_STRIDE.trailing_zeros())?;
    a.add(esi, XEN_FIFO_CONTROL as u32)?;
    a.mov(edi, ebx)?;
    a.shl(edi, 6u32)?;
    a.add(edi, XEN_FIFO_HEADS as u32)?;
    // EBX = vcpu_info, as for the 2-level consumer.
    a.cmp(ebx, 32u32)?;
    a.jb(fifo_legacy)?;
    a.sub(ebx, 32u32)?;
    a.shl(ebx, XEN_VCPU_INFO_SIZE.trailing_zeros())?;
    a.add(ebx, XEN_VCPU_INFO_EXT as u32)?;
    a.jmp(xen_fifo)?;
    a.set_label(&mut fifo_legacy)?;
    a.shl(ebx, XEN_VCPU_INFO_SIZE.trailing_zeros())?;
    a.add(ebx, XEN_SHARED_INFO as u32)?;
    a.set_label(&mut xen_fifo)?;
    a.mov(ebp, XEN_CONSUMER_MAX_PASSES)?;
    a.set_label(&mut fifo_pass)?;
    a.mov(byte_ptr(ebx + XEN_UPCALL_PENDING_OFFSET as i32), 0u32)?;
    a.push(ebx)?;
    a.push(ebp)?;
    a.mov(ebp, XEN_FIFO_BUDGET)?;
    a.xor(edx, edx)?;
    a.set_label(&mut fifo_ready_xchg)?;
    a.xchg(dword_ptr(esi), edx)?;
    a.and(edx, 0xFFFFu32)?;
    a.set_label(&mut fifo_loop)?;
    a.test(edx, edx)?;
    a.jz(fifo_pass_done)?;
    a.dec(ebp)?;
    a.jz(fifo_budget)?;
    a.bsf(ecx, edx)?;
    a.mov(eax, dword_ptr(edi + ecx * 4))?;
    a.test(eax, eax)?;
    a.jnz(fifo_have_head)?;
    a.mov(eax, dword_ptr(esi + ecx * 4 + 8))?;
    a.set_label(&mut fifo_have_head)?;
    a.and(eax, FIFO_LINK)?;
    a.lea(ebx, dword_ptr(eax * 4 + XEN_FIFO_ARRAY as i32))?;
    a.mov(eax, dword_ptr(ebx))?;
    // clear_linked: EAX = the word as last seen; on failure cmpxchg loads the new one.
    a.set_label(&mut fifo_unlink)?;
    a.push(ecx)?;
    a.mov(ecx, eax)?;
    a.and(ecx, !(FIFO_LINKED | FIFO_LINK))?;
    a.set_label(&mut fifo_cmpxchg)?;
    a.lock().cmpxchg(dword_ptr(ebx), ecx)?;
    a.pop(ecx)?;
    a.jnz(fifo_unlink)?;
    a.and(eax, FIFO_LINK)?;
    a.mov(dword_ptr(edi + ecx * 4), eax)?;
    a.test(eax, eax)?;
    a.jnz(fifo_handle)?;
    a.btr(edx, ecx)?;
    a.set_label(&mut fifo_handle)?;
    a.mov(eax, dword_ptr(ebx))?;
    a.test(eax, FIFO_MASKED)?;
    a.jnz(fifo_next)?;
    a.set_label(&mut fifo_pending_btr)?;
    a.lock().btr(dword_ptr(ebx), 31u32)?;
    a.jnc(fifo_next)?;
    a.mov(eax, ebx)?;
    a.sub(eax, XEN_FIFO_ARRAY as u32)?;
    a.shr(eax, 2u32)?;
    a.cmp(eax, XEN_2L_PORTS as u32)?;
    a.jae(fifo_no_counter)?;
    a.lock()
        .inc(dword_ptr(eax * 4 + XEN_PORT_COUNTERS as i32))?;
    a.set_label(&mut fifo_no_counter)?;
    a.push(ebx)?;
    a.mov(ebx, XEN_FIFO_FLAG as u32)?;
    a.test(dword_ptr(ebx), 2u32)?;
    a.jz(fifo_counted)?;
    a.push(ecx)?;
    a.mov(ebx, XEN_FIFO_SEEN as u32)?;
    a.lock().bts(dword_ptr(ebx), eax)?;
    a.jnc(fifo_first)?;
    a.mov(ebx, XEN_FIFO_DUPS as u32)?;
    a.lock().inc(dword_ptr(ebx))?;
    a.set_label(&mut fifo_first)?;
    a.mov(ecx, 1u32)?;
    a.mov(ebx, XEN_FIFO_LOG_COUNT as u32)?;
    a.lock().xadd(dword_ptr(ebx), ecx)?;
    a.cmp(ecx, XEN_FIFO_LOG_CAP)?;
    a.jae(fifo_no_log)?;
    a.mov(dword_ptr(ecx * 4 + XEN_FIFO_LOG as i32), eax)?;
    a.set_label(&mut fifo_no_log)?;
    a.pop(ecx)?;
    // The total last: a host that saw it reach n finds the n events recorded.
    a.set_label(&mut fifo_counted)?;
    a.mov(ebx, XEN_FIFO_TOTAL as u32)?;
    a.lock().inc(dword_ptr(ebx))?;
    a.pop(ebx)?;
    a.set_label(&mut fifo_next)?;
    a.xor(eax, eax)?;
    a.xchg(dword_ptr(esi), eax)?;
    a.and(eax, 0xFFFFu32)?;
    a.or(edx, eax)?;
    a.jmp(fifo_loop)?;
    // Out of budget: hand the ready priorities back for the next upcall.
    a.set_label(&mut fifo_budget)?;
    a.lock().or(dword_ptr(esi), edx)?;
    a.set_label(&mut fifo_pass_done)?;
    a.pop(ebp)?;
    a.pop(ebx)?;
    a.cmp(byte_ptr(ebx + XEN_UPCALL_PENDING_OFFSET as i32), 0u32)?;
    a.je(xen_done)?;
    a.dec(ebp)?;
    a.jnz(fifo_pass)?;
    a.jmp(xen_done)?;

    // --- One stub per vector; the upcall vector's runs the consumer first.
    let mut stubs: Vec<CodeLabel> = (0..VECTORS).map(|_| a.create_label()).collect();
    for (vector, stub) in stubs.iter_mut().enumerate() {
        a.set_label(stub)?;
        a.push(eax)?;
        a.mov(al, vector as u32)?;
        if vector == usize::from(XEN_UPCALL_VECTOR) {
            a.jmp(xen_upcall)?;
        } else {
            a.jmp(common)?;
        }
    }

    let result = a.assemble_options(
        CODE_ADDR,
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let code = result.inner.code_buffer.clone();
    if CODE_ADDR + code.len() as u64 > CODE_END {
        return Err(AsmError(format!(
            "{} bytes of code overflow the code area",
            code.len()
        )));
    }
    let mut stub_offsets = [0u16; VECTORS];
    for (offset, stub) in stub_offsets.iter_mut().zip(&stubs) {
        *offset = ip_of(&result, stub)?;
    }
    let marks = Marks {
        svr_write: ip_of(&result, &svr_write)?,
        script_write: ip_of(&result, &script_write)?,
        counter_inc: ip_of(&result, &counter_inc)?,
        isr_out: ip_of(&result, &isr_out)?,
        iret: ip_of(&result, &iret)?,
        hcall_out: ip_of(&result, &hcall_out)?,
        upcall_clear: ip_of(&result, &xen_pass)?,
        sel_xchg: ip_of(&result, &sel_xchg)?,
        pending_btr: ip_of(&result, &pending_btr)?,
        port_inc: ip_of(&result, &port_inc)?,
        common: ip_of(&result, &common)?,
        xen_upcall: ip_of(&result, &xen_upcall)?,
    };
    let image = GuestImage {
        code,
        code_addr: CODE_ADDR,
        entry_ip: ip_of(&result, &entry)?,
        stub_offsets,
    };
    Ok((image, marks))
}

/// Writes the IVT, the code and the boot MMIO script into `mem`, and zeroes the counters.
/// Call before starting the vCPUs.
pub fn load(
    mem: &GuestMemoryMmap,
    image: &GuestImage,
    mmio_script: &[(u32, u32)],
) -> Result<(), GuestError> {
    if mmio_script.len() > MMIO_SCRIPT_MAX {
        return Err(GuestError::ScriptTooLong(mmio_script.len()));
    }
    for (vector, &offset) in image.stub_offsets.iter().enumerate() {
        let entry = IVT_ADDR + vector as u64 * IVT_ENTRY_SIZE;
        mem.write_obj(offset, GuestAddress(entry))?;
        mem.write_obj(0u16, GuestAddress(entry + 2))?; // segment
    }
    mem.write_slice(&image.code, GuestAddress(image.code_addr))?;
    write_script(mem, mmio_script)?;
    mem.write_obj(0u32, GuestAddress(CMD_SEQ_ADDR))?;
    mem.write_obj(0u32, GuestAddress(CMD_DONE_ADDR))?;
    mem.write_slice(&[0u8; COUNTERS_SIZE as usize], GuestAddress(COUNTERS_ADDR))?;
    let mailboxes = HYPERCALL_MAILBOX_SIZE as usize * MAX_VCPUS;
    mem.write_slice(&vec![0u8; mailboxes], GuestAddress(HYPERCALL_MAILBOX))?;
    // The Xen areas lie above 64 KiB; a smaller RAM (unit tests) simply has no Xen guest.
    for (addr, len) in [
        (XEN_SHARED_INFO, XEN_SHARED_INFO_SIZE),
        (XEN_PORT_COUNTERS, XEN_PORT_COUNTERS_SIZE),
    ] {
        if mem.check_range(GuestAddress(addr), len as usize) {
            mem.write_slice(&vec![0u8; len as usize], GuestAddress(addr))?;
        }
    }
    Ok(())
}

fn write_script(mem: &GuestMemoryMmap, mmio_script: &[(u32, u32)]) -> Result<(), GuestError> {
    if mmio_script.len() > MMIO_SCRIPT_MAX {
        return Err(GuestError::ScriptTooLong(mmio_script.len()));
    }
    mem.write_obj(
        mmio_script.len() as u32,
        GuestAddress(MMIO_SCRIPT_COUNT_ADDR),
    )?;
    for (i, &(addr, value)) in mmio_script.iter().enumerate() {
        let entry = MMIO_SCRIPT_ENTRIES_ADDR + i as u64 * MMIO_SCRIPT_ENTRY_SIZE;
        mem.write_obj(addr, GuestAddress(entry))?;
        mem.write_obj(value, GuestAddress(entry + 4))?;
    }
    Ok(())
}

/// Posts a runtime MMIO command: writes the script and bumps the sequence number. The caller
/// then rings [`DOORBELL_VECTOR`] on vCPU 0 and waits for [`DONE_PORT`] (or
/// [`command_done`]). Returns the new sequence number. Only one command may be in flight.
pub fn post_command(mem: &GuestMemoryMmap, mmio_script: &[(u32, u32)]) -> Result<u32, GuestError> {
    write_script(mem, mmio_script)?;
    let seq: u32 = mem.read_obj(GuestAddress(CMD_SEQ_ADDR))?;
    let seq = seq.wrapping_add(1);
    mem.write_obj(seq, GuestAddress(CMD_SEQ_ADDR))?;
    Ok(seq)
}

/// The script's values after vCPU 0 ran it: reads (address bit 0 set) hold what they read.
pub fn script_results(mem: &GuestMemoryMmap, len: usize) -> Result<Vec<u32>, GuestError> {
    (0..len.min(MMIO_SCRIPT_MAX))
        .map(|i| {
            let entry = MMIO_SCRIPT_ENTRIES_ADDR + i as u64 * MMIO_SCRIPT_ENTRY_SIZE;
            Ok(mem.read_obj(GuestAddress(entry + 4))?)
        })
        .collect()
}

/// How many times the guest's event channel consumer acked `port`; 0 beyond the 2-level
/// ports or when RAM does not hold the counters.
pub fn read_port_counter(mem: &GuestMemoryMmap, port: u32) -> u32 {
    port_counter_addr(port)
        .and_then(|addr| mem.load(GuestAddress(addr), Ordering::Acquire).ok())
        .unwrap_or(0)
}

/// An aligned u32 of guest memory as an atomic, for the read-modify-write steps the guest
/// performs with locked instructions.
fn guest_atomic_u32(mem: &GuestMemoryMmap, addr: u64) -> Result<&AtomicU32, GuestError> {
    let slice = mem.get_slice(GuestAddress(addr), 4)?;
    let atomic: *const AtomicU32 = slice
        .get_atomic_ref::<AtomicU32>(0)
        .map_err(GuestMemoryError::from)?;
    // SAFETY: the VolatileSlice borrows `mem`, whose regions stay mapped at least as long as
    // `mem` lives; get_atomic_ref checked bounds and alignment. The reference is tied to the
    // lifetime of `mem`, not of the temporary slice value.
    Ok(unsafe { &*atomic })
}

/// The guest's Xen 2-level consumer, step for step, for a vCPU the host simulates
/// ([`crate::machine::SimMachine`], which cannot run the assembled one): on the compat
/// `shared_info` at [`XEN_SHARED_INFO`], for the vCPU with APIC ID `apic_id` (clamped like
/// the guest does). Clears upcall_pending, takes the selector with an atomic exchange, acks
/// (atomically clears) every pending unmasked port of each selected word and bumps its
/// counter at [`XEN_PORT_COUNTERS`]; repeats while upcall_pending was set again, at most
/// [`XEN_CONSUMER_MAX_PASSES`] times. Returns how many ports it acked.
pub fn xen_2l_consume(mem: &GuestMemoryMmap, apic_id: usize) -> Result<u32, GuestError> {
    let vcpu_info = xen_vcpu_info(apic_id);
    let upcall_pending = GuestAddress(vcpu_info + XEN_UPCALL_PENDING_OFFSET);
    let sel_word = guest_atomic_u32(mem, vcpu_info + XEN_PENDING_SEL_OFFSET)?;
    let pending_base = XEN_SHARED_INFO + XEN_EVTCHN_PENDING_OFFSET;
    let mask_base = XEN_SHARED_INFO + XEN_EVTCHN_MASK_OFFSET;
    let mut acked = 0;
    for _ in 0..XEN_CONSUMER_MAX_PASSES {
        mem.store(0u8, upcall_pending, Ordering::SeqCst)?;
        let mut sel = sel_word.swap(0, Ordering::SeqCst);
        while sel != 0 {
            let word = sel.trailing_zeros();
            sel &= !(1 << word);
            let pending = guest_atomic_u32(mem, pending_base + u64::from(word) * 4)?;
            let mask = guest_atomic_u32(mem, mask_base + u64::from(word) * 4)?;
            let mut bits = pending.load(Ordering::SeqCst) & !mask.load(Ordering::SeqCst);
            while bits != 0 {
                let bit = bits.trailing_zeros();
                bits &= !(1 << bit);
                // Only the consumer whose and cleared the bit handles the port.
                if pending.fetch_and(!(1 << bit), Ordering::SeqCst) & 1 << bit == 0 {
                    continue;
                }
                let port = word * 32 + bit;
                if let Some(addr) = port_counter_addr(port) {
                    guest_atomic_u32(mem, addr)?.fetch_add(1, Ordering::SeqCst);
                }
                acked += 1;
            }
        }
        if mem.load::<u8>(upcall_pending, Ordering::SeqCst)? == 0 {
            break;
        }
    }
    Ok(acked)
}

/// The guest's FIFO words at their fixed places in the test layout (port `p` at
/// `XEN_FIFO_ARRAY + 4 p`, APIC ID `a`'s control block at [`xen_fifo_control`]), for the
/// simulated consumer.
struct LayoutWords<'a>(&'a GuestMemoryMmap);

impl vmirq::xen::fifo::Words for LayoutWords<'_> {
    type A = AtomicU32;

    fn event(&self, port: u32) -> Option<&AtomicU32> {
        (port < XEN_FIFO_PORTS)
            .then(|| guest_atomic_u32(self.0, XEN_FIFO_ARRAY + u64::from(port) * 4).ok())
            .flatten()
    }

    fn control(&self, vcpu: u32, priority: u32) -> Option<(&AtomicU32, &AtomicU32)> {
        let cb = xen_fifo_control(vcpu as usize);
        let ready = guest_atomic_u32(self.0, cb).ok()?;
        let head = guest_atomic_u32(self.0, cb + 8 + u64::from(priority) * 4).ok()?;
        Some((ready, head))
    }
}

/// Counts a port the FIFO consumer handled, as the assembled consumer does.
fn fifo_count(mem: &GuestMemoryMmap, port: u32, record: bool) -> Result<(), GuestError> {
    if let Some(addr) = port_counter_addr(port) {
        guest_atomic_u32(mem, addr)?.fetch_add(1, Ordering::SeqCst);
    }
    if record {
        fifo_record(mem, port)?;
    }
    // The total last, as the assembled consumer: who saw it reach n finds n events recorded.
    guest_atomic_u32(mem, XEN_FIFO_TOTAL)?.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// Records a handled port in the seen bitmap (a duplicate counted) and the log.
fn fifo_record(mem: &GuestMemoryMmap, port: u32) -> Result<(), GuestError> {
    let seen = guest_atomic_u32(mem, XEN_FIFO_SEEN + u64::from(port / 32) * 4)?;
    if seen.fetch_or(1 << (port % 32), Ordering::SeqCst) & 1 << (port % 32) != 0 {
        guest_atomic_u32(mem, XEN_FIFO_DUPS)?.fetch_add(1, Ordering::SeqCst);
    }
    let i = guest_atomic_u32(mem, XEN_FIFO_LOG_COUNT)?.fetch_add(1, Ordering::SeqCst);
    if i < XEN_FIFO_LOG_CAP {
        guest_atomic_u32(mem, XEN_FIFO_LOG + u64::from(i) * 4)?.store(port, Ordering::SeqCst);
    }
    Ok(())
}

/// The guest's upcall handler for a vCPU the host simulates: the FIFO consumer (through
/// [`vmirq::xen::fifo::consume`], Linux's algorithm, which the assembled one follows step for
/// step) once [`XEN_FIFO_FLAG`] is set, else [`xen_2l_consume`]. Returns the events handled.
pub fn xen_consume(mem: &GuestMemoryMmap, apic_id: usize) -> Result<u32, GuestError> {
    let flag = mem.read_obj::<u32>(GuestAddress(XEN_FIFO_FLAG))?;
    if flag == 0 {
        return xen_2l_consume(mem, apic_id);
    }
    let upcall_pending = GuestAddress(xen_vcpu_info(apic_id) + XEN_UPCALL_PENDING_OFFSET);
    let heads_at = xen_fifo_heads(apic_id);
    let mut heads = [0u32; 16];
    for (i, h) in heads.iter_mut().enumerate() {
        *h = mem.read_obj(GuestAddress(heads_at + i as u64 * 4))?;
    }
    let words = LayoutWords(mem);
    let mut handled = Vec::new();
    for _ in 0..XEN_CONSUMER_MAX_PASSES {
        mem.store(0u8, upcall_pending, Ordering::SeqCst)?;
        vmirq::xen::fifo::consume(&words, apic_id as u32, &mut heads, XEN_FIFO_BUDGET, |p| {
            handled.push(p)
        });
        if mem.load::<u8>(upcall_pending, Ordering::SeqCst)? == 0 {
            break;
        }
    }
    for (i, h) in heads.iter().enumerate() {
        mem.write_obj(*h, GuestAddress(heads_at + i as u64 * 4))?;
    }
    for &p in &handled {
        fifo_count(mem, p, flag & XEN_FIFO_RECORD != 0)?;
    }
    Ok(handled.len() as u32)
}

/// Whether vCPU 0 has finished command `seq`.
pub fn command_done(mem: &GuestMemoryMmap, seq: u32) -> bool {
    mem.read_obj::<u32>(GuestAddress(CMD_DONE_ADDR))
        .is_ok_and(|done| done == seq)
}

/// How many times `vector` was taken by the vCPU with APIC ID `vcpu`; 0 for a vCPU beyond
/// the layout or RAM too small to hold the counters ([`try_read_counter`] says which).
pub fn read_counter(mem: &GuestMemoryMmap, vcpu: usize, vector: u8) -> u32 {
    try_read_counter(mem, vcpu, vector).unwrap_or(0)
}

/// [`read_counter`] that reports why a counter cannot be read.
pub fn try_read_counter(mem: &GuestMemoryMmap, vcpu: usize, vector: u8) -> Result<u32, GuestError> {
    let addr = counter_addr(vcpu, vector).ok_or(GuestError::VcpuOutOfRange { vcpu })?;
    // The guest updates it with `lock inc`; an aligned atomic load sees whole values.
    Ok(mem.load(GuestAddress(addr), Ordering::Acquire)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of the instruction at `ip`.
    fn at(image: &GuestImage, ip: u16, len: usize) -> &[u8] {
        let start = usize::from(ip) - image.code_addr as usize;
        &image.code[start..start + len]
    }

    /// Operand-size (0x66) and address-size (0x67) prefixes, in either order.
    fn has_both_size_prefixes(bytes: &[u8]) -> bool {
        let mut p = [bytes[0], bytes[1]];
        p.sort_unstable();
        p == [0x66, 0x67]
    }

    #[test]
    fn lapic_write_uses_32_bit_operand_and_address() {
        let (image, marks) = assemble().unwrap();
        // mov dword [ebx], 0x1FF: 66 67 C7 /0 ModRM 03 imm32
        let bytes = at(&image, marks.svr_write, 8);
        assert!(has_both_size_prefixes(bytes), "{bytes:02x?}");
        assert_eq!(&bytes[2..], &[0xC7, 0x03, 0xFF, 0x01, 0x00, 0x00]);
    }

    #[test]
    fn script_write_is_a_32_bit_store_through_ebx() {
        let (image, marks) = assemble().unwrap();
        // mov dword [ebx], eax: 66 67 89 ModRM 03
        let bytes = at(&image, marks.script_write, 4);
        assert!(has_both_size_prefixes(bytes), "{bytes:02x?}");
        assert_eq!(&bytes[2..], &[0x89, 0x03]);
    }

    #[test]
    fn counter_increment_is_locked_with_sib_and_disp32() {
        let (image, marks) = assemble().unwrap();
        // lock inc dword [ebx+eax*4+0x40000]: F0 66 67 FF ModRM 84 SIB 83 disp32
        let bytes = at(&image, marks.counter_inc, 10);
        assert_eq!(bytes[0], 0xF0, "{bytes:02x?}");
        assert!(has_both_size_prefixes(&bytes[1..]), "{bytes:02x?}");
        assert_eq!(&bytes[3..], &[0xFF, 0x84, 0x83, 0x00, 0x00, 0x04, 0x00]);
    }

    #[test]
    fn isr_reports_with_out_dx_al_and_returns_with_16_bit_iret() {
        let (image, marks) = assemble().unwrap();
        assert_eq!(at(&image, marks.isr_out, 1), &[0xEE]);
        assert_eq!(at(&image, marks.iret, 1), &[0xCF]);
    }

    #[test]
    fn every_stub_saves_eax_then_loads_its_vector() {
        let image = build();
        for (vector, &ip) in image.stub_offsets.iter().enumerate() {
            // push eax (66 50); mov al, imm8 (B0 ib)
            assert_eq!(at(&image, ip, 4), &[0x66, 0x50, 0xB0, vector as u8]);
        }
        assert_eq!(image.entry_ip as u64, CODE_ADDR);
        assert!(CODE_ADDR + image.code.len() as u64 <= CODE_END);
    }

    /// Where the jmp at `ip` (EB rel8 or E9 rel16) goes.
    fn jmp_target(image: &GuestImage, ip: u16) -> u16 {
        match at(image, ip, 1)[0] {
            0xEB => {
                let rel = at(image, ip + 1, 1)[0] as i8;
                (ip + 2).wrapping_add(rel as i16 as u16)
            }
            0xE9 => {
                let b = at(image, ip + 1, 2);
                (ip + 3).wrapping_add(u16::from_le_bytes([b[0], b[1]]))
            }
            other => panic!("no jmp at {ip:#x}: {other:#04x}"),
        }
    }

    #[test]
    fn only_the_upcall_stub_runs_the_xen_consumer() {
        let (image, marks) = assemble().unwrap();
        for (vector, &ip) in image.stub_offsets.iter().enumerate() {
            let want = if vector == usize::from(XEN_UPCALL_VECTOR) {
                marks.xen_upcall
            } else {
                marks.common
            };
            assert_eq!(jmp_target(&image, ip + 4), want, "vector {vector:#x}");
        }
    }

    #[test]
    fn consumer_clears_upcall_pending_with_a_byte_store_and_takes_sel_with_xchg() {
        let (image, marks) = assemble().unwrap();
        // mov byte [ebx], 0: 67 C6 ModRM 03 imm8 (no operand-size prefix: a byte store)
        assert_eq!(at(&image, marks.upcall_clear, 4), &[0x67, 0xC6, 0x03, 0x00]);
        // xchg dword [ebx+4], esi: 66 67 87 ModRM 73 disp8 04 (implicitly locked)
        let bytes = at(&image, marks.sel_xchg, 5);
        assert!(has_both_size_prefixes(bytes), "{bytes:02x?}");
        assert_eq!(&bytes[2..], &[0x87, 0x73, 0x04]);
    }

    #[test]
    fn consumer_acks_with_locked_btr_and_counts_with_locked_inc() {
        let (image, marks) = assemble().unwrap();
        // lock btr dword [ecx*4+0x20800], edx: F0 66 67 0F B3 ModRM 14 SIB 8D disp32
        let bytes = at(&image, marks.pending_btr, 11);
        assert_eq!(bytes[0], 0xF0, "{bytes:02x?}");
        assert!(has_both_size_prefixes(&bytes[1..]), "{bytes:02x?}");
        let pending = (XEN_SHARED_INFO + XEN_EVTCHN_PENDING_OFFSET) as u32;
        let mut want = vec![0x0F, 0xB3, 0x14, 0x8D];
        want.extend_from_slice(&pending.to_le_bytes());
        assert_eq!(&bytes[3..], &want[..]);
        // lock inc dword [eax*4+0x30000]: F0 66 67 FF ModRM 04 SIB 85 disp32
        let bytes = at(&image, marks.port_inc, 10);
        assert_eq!(bytes[0], 0xF0, "{bytes:02x?}");
        assert!(has_both_size_prefixes(&bytes[1..]), "{bytes:02x?}");
        let mut want = vec![0xFF, 0x04, 0x85];
        want.extend_from_slice(&(XEN_PORT_COUNTERS as u32).to_le_bytes());
        assert_eq!(&bytes[3..], &want[..]);
    }

    #[test]
    fn hypercall_rings_the_doorbell_with_out_dx_al() {
        let (image, marks) = assemble().unwrap();
        assert_eq!(at(&image, marks.hcall_out, 1), &[0xEE]);
    }

    /// Compat shared_info with ports 5 and 37 pending, port 6 pending but masked, selector
    /// bits 0 and 1 and upcall_pending set for APIC ID `apic`.
    fn pending_5_37_masked_6(mem: &GuestMemoryMmap, apic: usize) {
        let pending = XEN_SHARED_INFO + XEN_EVTCHN_PENDING_OFFSET;
        let mask = XEN_SHARED_INFO + XEN_EVTCHN_MASK_OFFSET;
        mem.write_obj(1u32 << 5 | 1 << 6, GuestAddress(pending))
            .unwrap();
        mem.write_obj(1u32 << 5, GuestAddress(pending + 4)).unwrap();
        mem.write_obj(1u32 << 6, GuestAddress(mask)).unwrap();
        let info = xen_vcpu_info(apic);
        mem.write_obj(0b11u32, GuestAddress(info + XEN_PENDING_SEL_OFFSET))
            .unwrap();
        mem.write_obj(1u8, GuestAddress(info + XEN_UPCALL_PENDING_OFFSET))
            .unwrap();
    }

    #[test]
    fn rust_consumer_acks_unmasked_ports_and_leaves_masked_ones_pending() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        load(&mem, &build(), &[]).unwrap();
        pending_5_37_masked_6(&mem, 1);
        assert_eq!(xen_2l_consume(&mem, 1).unwrap(), 2);
        assert_eq!(read_port_counter(&mem, 5), 1);
        assert_eq!(read_port_counter(&mem, 37), 1);
        assert_eq!(read_port_counter(&mem, 6), 0);
        let pending = XEN_SHARED_INFO + XEN_EVTCHN_PENDING_OFFSET;
        assert_eq!(mem.read_obj::<u32>(GuestAddress(pending)).unwrap(), 1 << 6);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(pending + 4)).unwrap(), 0);
        let info = xen_vcpu_info(1);
        let sel: u32 = mem
            .read_obj(GuestAddress(info + XEN_PENDING_SEL_OFFSET))
            .unwrap();
        let upcall: u8 = mem.read_obj(GuestAddress(info)).unwrap();
        assert_eq!((sel, upcall), (0, 0));
        // vCPU 0's vcpu_info was not touched; a second run finds nothing.
        assert_eq!(xen_2l_consume(&mem, 0).unwrap(), 0);
        assert_eq!(read_port_counter(&mem, XEN_2L_PORTS as u32), 0);
    }

    #[test]
    fn load_writes_ivt_code_and_script() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let image = build();
        let script = [(IOAPIC_IOREGSEL, 0x1a), (IOAPIC_IOWIN, 0x45)];
        load(&mem, &image, &script).unwrap();
        let off: u16 = mem.read_obj(GuestAddress(0x40 * 4)).unwrap();
        let seg: u16 = mem.read_obj(GuestAddress(0x40 * 4 + 2)).unwrap();
        assert_eq!((seg, off), (0, image.stub_offsets[0x40]));
        let count: u32 = mem.read_obj(GuestAddress(MMIO_SCRIPT_COUNT_ADDR)).unwrap();
        assert_eq!(count, 2);
        let value: u32 = mem
            .read_obj(GuestAddress(MMIO_SCRIPT_ENTRIES_ADDR + 12))
            .unwrap();
        assert_eq!(value, 0x45);
        let mut code = vec![0; image.code.len()];
        mem.read_slice(&mut code, GuestAddress(CODE_ADDR)).unwrap();
        assert_eq!(code, image.code);
        assert_eq!(try_read_counter(&mem, 7, 0xff).unwrap(), 0);
    }

    #[test]
    fn oversized_script_and_bad_vcpu_are_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let script = vec![(0u32, 0u32); MMIO_SCRIPT_MAX + 1];
        assert!(matches!(
            load(&mem, &build(), &script),
            Err(GuestError::ScriptTooLong(65))
        ));
        assert!(matches!(
            try_read_counter(&mem, MAX_VCPUS, 0),
            Err(GuestError::VcpuOutOfRange { vcpu: 48 })
        ));
        assert_eq!(read_counter(&mem, MAX_VCPUS, 0), 0);
        assert!(build().boot(MAX_VCPUS + 1).is_err());
        let boot = build().boot(MAX_VCPUS).unwrap();
        assert_eq!(((boot.stack_top)(0), (boot.stack_top)(1)), (0xF000, 0xEE00));
    }
}
