//! `EventChannels::hypercall` and every other hypercall `vmirq::xen::Hypercalls` serves (vcpu,
//! sched, hvm, memory and physdev ops) as a hostile guest calls them: any number, command, vCPU
//! and argument address, with guest memory (arguments, shared_info, vcpu_info) rewritten
//! between calls, and the lock-free paths (set_pending, VIRQs, PIRQ MSIs) interleaved. Polls
//! get a timeout in the past (a poll with none would wait for an event, as on Xen). Invariants:
//! no panic; no call longer than 100 ms; nothing written to guest memory outside the argument
//! structs, shared_info (wherever the guest moved it), the vcpu_info areas it registered and
//! the FIFO control blocks and event-array pages it registered (EVTCHNOP 11 and 12 switch the
//! guest to FIFO; pokes then scribble over its event words).
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmirq::xen::hypercall::{nr, schedop};
use vmirq::xen::{attach, pirq_msi, Hypercalls, XenConfig};
use vmirq::{Config, Interrupts, IrqchipMode, SimBackend};

const RAM: usize = 0x4_0000;
const SHINFO: u64 = 0x2_0000;
const ARGS: u64 = 0x1000;
const FILL: u8 = 0xA5;

/// The hypercall numbers the dispatcher serves, and one it does not.
const NUMBERS: [u32; 7] = [
    nr::MEMORY_OP,
    nr::VCPU_OP,
    nr::SCHED_OP,
    nr::EVENT_CHANNEL_OP,
    nr::PHYSDEV_OP,
    nr::HVM_OP,
    7,
];

#[derive(Arbitrary, Debug)]
enum Op {
    /// A hypercall with its argument bytes at ARGS (or anywhere, when `stray`).
    Call {
        cmd: u8,
        vcpu: u8,
        args: [u8; 24],
        stray: Option<u32>,
    },
    /// The guest rewrites guest memory: shared_info, the arguments, or a vcpu_info.
    Poke {
        at: u16,
        bytes: Vec<u8>,
    },
    SetPending {
        port: u16,
        vcpu: u8,
    },
    Virq {
        virq: u8,
        vcpu: u8,
    },
    RegisterVcpuInfo {
        vcpu: u8,
        page: u8,
        offset: u16,
    },
    /// A hypercall by number through the dispatcher, its argument struct at ARGS (or anywhere).
    Xen {
        number: u8,
        cmd: u8,
        arg2: u8,
        args: [u8; 40],
        stray: Option<u32>,
    },
    PirqMsi {
        pirq: u16,
    },
    /// EVTCHNOP_init_control and expand_array with arguments in range (random ones rarely
    /// are), so the FIFO ABI is reached: a control block in page `page` at `offset`, then
    /// `pages` event-array pages from page `array`.
    Fifo {
        vcpu: u8,
        page: u8,
        offset: u16,
        array: u8,
        pages: u8,
    },
}

fuzz_target!(|input: (bool, Vec<Op>)| {
    let (long_mode, ops) = input;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
    mem.write_slice(&vec![FILL; RAM], GuestAddress(0)).unwrap();
    mem.write_slice(&[0u8; 0x1000], GuestAddress(SHINFO))
        .unwrap();
    let config = XenConfig {
        vcpus: 2,
        long_mode,
        shared_info_gpa: SHINFO,
        domid: 1,
    };
    let irq = Interrupts::new(SimBackend::new(2, IrqchipMode::Kernel), Config::default()).unwrap();
    let (ec, upcalls) = attach(&irq, mem.clone(), config);
    let calls = Hypercalls::new(Arc::clone(&ec), upcalls);
    // Where the guest (and so the ABI) may have written: [start, end).
    let mut writable: Vec<(u64, u64)> = vec![(ARGS, ARGS + 64), (SHINFO, SHINFO + 0x1000)];
    for op in ops.iter().take(300) {
        let t0 = Instant::now();
        match op {
            Op::Call {
                cmd,
                vcpu,
                args,
                stray,
            } => {
                let at = match stray {
                    // The guest named this struct: the hypercall may write its OUT fields.
                    Some(gpa) => {
                        let gpa = u64::from(*gpa);
                        writable.push((gpa, gpa.saturating_add(32)));
                        gpa
                    }
                    None => ARGS,
                };
                if at == ARGS {
                    mem.write_slice(args, GuestAddress(ARGS)).unwrap();
                }
                ec.hypercall(u32::from(*vcpu % 4), u32::from(*cmd % 16), at);
            }
            Op::Poke { at, bytes } => {
                // The guest writes only where it may (the checker's allowed areas).
                let (start, end) = writable[usize::from(*at) % writable.len()];
                let len = bytes.len().min((end - start) as usize);
                let _ = mem.write_slice(&bytes[..len], GuestAddress(start));
            }
            Op::SetPending { port, vcpu } => {
                let _ = ec.set_pending(u32::from(*port), u32::from(*vcpu % 4));
            }
            Op::Virq { virq, vcpu } => {
                let _ = ec.raise_virq(u32::from(*virq % 30), u32::from(*vcpu % 4));
            }
            Op::Xen {
                number,
                cmd,
                arg2,
                args,
                stray,
            } => {
                let number = NUMBERS[usize::from(*number) % NUMBERS.len()];
                let cmd = u64::from(*cmd % 32);
                let mut args = *args;
                let poll = number == nr::SCHED_OP && cmd == u64::from(schedop::POLL);
                let at = match stray {
                    Some(gpa) if !poll => {
                        let gpa = u64::from(*gpa);
                        writable.push((gpa, gpa.saturating_add(48)));
                        gpa
                    }
                    _ => ARGS,
                };
                if poll {
                    // struct sched_poll: the timeout at 16 (64-bit) or 8 (compat), in the past.
                    let timeout = if ec.config().long_mode { 16 } else { 8 };
                    args[timeout..timeout + 8].copy_from_slice(&1u64.to_le_bytes());
                }
                if at == ARGS {
                    mem.write_slice(&args, GuestAddress(ARGS)).unwrap();
                }
                let vcpu = u32::from(*arg2 % 4);
                let call = match number {
                    nr::VCPU_OP => [cmd, u64::from(vcpu), at],
                    _ => [cmd, at, 0],
                };
                calls.call(vcpu % 2, number, call);
                // shared_info and vcpu_info areas the guest placed are the ABI's to write.
                writable.push((ec.config().shared_info_gpa, ec.config().shared_info_gpa + 0x1000));
                for v in 0..2 {
                    if let Some(gpa) = ec.vcpu_info_gpa(v) {
                        writable.push((gpa, gpa + 64));
                    }
                }
                writable.sort_unstable();
                writable.dedup();
            }
            Op::Fifo {
                vcpu,
                page,
                offset,
                array,
                pages,
            } => {
                let pfn = |p: u8| u64::from(p) % (RAM as u64 / 0x1000);
                let mut init = [0u8; 24];
                init[0..8].copy_from_slice(&pfn(*page).to_le_bytes());
                init[8..12].copy_from_slice(&u32::from(*offset % 0x1000).to_le_bytes());
                init[12..16].copy_from_slice(&u32::from(*vcpu % 3).to_le_bytes());
                mem.write_slice(&init, GuestAddress(ARGS)).unwrap();
                ec.hypercall(0, 11, ARGS);
                for n in 0..*pages % 4 {
                    let gfn = pfn(array.wrapping_add(n));
                    mem.write_slice(&gfn.to_le_bytes(), GuestAddress(ARGS)).unwrap();
                    ec.hypercall(0, 12, ARGS);
                }
            }
            Op::PirqMsi { pirq } => {
                let _ = ec.deliver_pirq_msi(pirq_msi(u32::from(*pirq)));
            }
            Op::RegisterVcpuInfo { vcpu, page, offset } => {
                let gpa = 0x3_0000 + u64::from(*page % 16) * 0x1000 + u64::from(*offset % 0x1000);
                if ec.register_vcpu_info(u32::from(*vcpu % 4), gpa).is_ok() {
                    writable.push((gpa, gpa + 64));
                }
            }
        }
        assert!(
            t0.elapsed() < Duration::from_millis(100),
            "{op:?} took too long"
        );
        // FIFO control blocks and event-array pages the guest registered are the ABI's too.
        for area in ec.fifo_guest_areas() {
            if !writable.contains(&area) {
                writable.push(area);
            }
        }
    }
    // Timers still armed would fire into the checked memory: stop them first.
    for v in 0..2 {
        let _ = ec.stop_singleshot_timer(v, v);
        let _ = ec.stop_periodic_timer(v);
    }
    // Nothing outside the allowed areas changed.
    let mut ram = vec![0u8; RAM];
    mem.read_slice(&mut ram, GuestAddress(0)).unwrap();
    let mut at = 0;
    while let Some(i) = ram[at..].iter().position(|b| *b != FILL) {
        let a = (at + i) as u64;
        match writable
            .iter()
            .filter(|(s, e)| (*s..*e).contains(&a))
            .map(|(_, e)| *e)
            .max()
        {
            Some(end) => at = end.min(RAM as u64) as usize,
            None => panic!("guest memory at {a:#x} written outside the ABI's areas"),
        }
        if at >= RAM {
            break;
        }
    }
});
