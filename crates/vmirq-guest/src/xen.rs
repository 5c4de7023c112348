//! The test guest's Xen hypercalls by number. A real guest passes the hypercall number and its
//! arguments in registers; the test guest's mailbox has one command word, so it carries them
//! packed ([`xen_cmd`]), and [`serve_xen`] unpacks them for [`vmirq::xen::Hypercalls`].

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmirq::xen::hypercall::nr;
use vmirq::xen::{attach, EventChannels, Hypercalls, Upcalls, XenConfig};

use crate::layout::SCRATCH;
use crate::machine::{hypercall_op, Machine, MachineError};

/// Event channels for the test guest (a 32-bit compat guest, domain 1) with `vcpus` vCPUs and
/// shared_info at `shared_info_gpa`, attached to `m`'s interrupts; no hypercall served yet,
/// no upcall configured.
pub fn attach_compat(
    m: &dyn Machine,
    vcpus: u32,
    shared_info_gpa: u64,
) -> (Arc<EventChannels>, Arc<Upcalls>) {
    let memory = m
        .guest_memory()
        .expect("test machines have guest RAM")
        .clone();
    let config = XenConfig {
        vcpus,
        long_mode: false,
        shared_info_gpa,
        domid: 1,
    };
    attach(m.interrupts(), memory, config)
}

/// The mailbox command word for Xen hypercall `number` (0: `event_channel_op`), its operation
/// `op` (bits 7:0) and, for `vcpu_op`, the target vCPU `arg` (bits 31:16). The argument
/// struct's address is the mailbox's.
pub const fn xen_cmd(number: u32, op: u32, arg: u32) -> u32 {
    (op & 0xff) | (number & 0xff) << 8 | arg << 16
}

/// The guest (vCPU 0) makes hypercall `cmd` (an EVTCHNOP, or a [`xen_cmd`] word) with the
/// argument struct `args` at [`SCRATCH`]; returns its result and the struct as it left it.
pub fn hypercall(m: &dyn Machine, cmd: u32, args: &[u8]) -> Result<(i64, Vec<u8>), MachineError> {
    m.write_guest(SCRATCH, args)?;
    let r = m.guest_mmio(&[hypercall_op(cmd, SCRATCH as u32)])?[0] as i32;
    let mut out = vec![0; args.len()];
    m.read_guest(SCRATCH, &mut out)?;
    Ok((i64::from(r), out))
}

/// The u32 of guest RAM at `gpa` (the tests' view of the guest's words). Panics outside RAM.
pub fn read_u32(m: &dyn Machine, gpa: u64) -> u32 {
    let mut b = [0; 4];
    m.read_guest(gpa, &mut b)
        .expect("a test address inside guest RAM");
    u32::from_le_bytes(b)
}

/// Writes `v` to the u32 of guest RAM at `gpa`. Panics outside RAM.
pub fn write_u32(m: &dyn Machine, gpa: u64, v: u32) {
    m.write_guest(gpa, &v.to_le_bytes())
        .expect("a test address inside guest RAM");
}

/// A VMM thread that sends on `port` once a vCPU blocks in SCHEDOP_poll (positive evidence
/// the poll waits), panicking if none does within `wait`.
pub fn wake_poller(channels: &Arc<EventChannels>, port: u32, wait: Duration) -> JoinHandle<()> {
    let channels = Arc::clone(channels);
    std::thread::spawn(move || {
        let deadline = Instant::now() + wait;
        while channels.pollers() == 0 {
            assert!(Instant::now() < deadline, "no vCPU blocked in its poll");
            std::thread::yield_now();
        }
        channels
            .notify_port(port)
            .expect("the polled port is bound");
    })
}

/// The machine's guest serves its hypercalls with `hypercalls`: a plain `EVTCHNOP` command word
/// is `event_channel_op`, as for [`crate::migration::serve_hypercalls`].
pub fn serve_xen(m: &dyn Machine, hypercalls: Arc<Hypercalls>) {
    m.set_hypercall_handler(Arc::new(move |vcpu: usize, cmd: u32, gpa: u64| {
        let (number, op, arg) = (
            (cmd >> 8) & 0xff,
            u64::from(cmd & 0xff),
            u64::from(cmd >> 16),
        );
        let args = match number {
            0 => return hypercalls.call(vcpu as u32, nr::EVENT_CHANNEL_OP, [op, gpa, 0]),
            nr::VCPU_OP => [op, arg, gpa],
            _ => [op, gpa, 0],
        };
        hypercalls.call(vcpu as u32, number, args)
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_word_packs_number_op_and_vcpu() {
        assert_eq!(xen_cmd(0, 4, 0), 4, "a plain EVTCHNOP");
        assert_eq!(xen_cmd(nr::VCPU_OP, 8, 1), 0x1_1808);
    }
}
