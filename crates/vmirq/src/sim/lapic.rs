//! A deterministic local APIC: IRR, ISR and TMR for 256 vectors, priority by vector class,
//! EOI of the highest in-service vector. Intel SDM vol. 3 §11.8.

/// A 256-bit vector register (IRR, ISR, TMR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Bits256([u64; 4]);

impl Bits256 {
    fn get(&self, v: u8) -> bool {
        self.0[usize::from(v >> 6)] & (1 << (v & 63)) != 0
    }

    fn set(&mut self, v: u8, on: bool) {
        let word = &mut self.0[usize::from(v >> 6)];
        if on {
            *word |= 1 << (v & 63);
        } else {
            *word &= !(1 << (v & 63));
        }
    }

    fn highest(&self) -> Option<u8> {
        (0..4).rev().find_map(|i| {
            let w = self.0[i];
            (w != 0).then(|| (i as u32 * 64 + 63 - w.leading_zeros()) as u8)
        })
    }
}

/// One vCPU's local APIC, reduced to what interrupt delivery needs.
#[derive(Clone, Debug, Default)]
pub struct Lapic {
    irr: Bits256,
    isr: Bits256,
    tmr: Bits256,
    /// Vectors 0-15 are illegal for fixed delivery; a real LAPIC drops them and sets ESR.
    illegal_vectors: u64,
}

impl Lapic {
    /// Accepts a fixed interrupt. An edge vector already pending in IRR coalesces (returns
    /// false), as on hardware. TMR records the trigger mode for the EOI broadcast.
    pub fn accept(&mut self, vector: u8, level: bool) -> bool {
        if vector < 16 {
            self.illegal_vectors += 1;
            return false;
        }
        let fresh = !self.irr.get(vector);
        self.irr.set(vector, true);
        self.tmr.set(vector, level);
        fresh
    }

    /// The vector the CPU would take now: the highest in IRR whose priority class is above
    /// the highest in-service class (TPR is 0 in vmirq's guests).
    pub fn deliverable(&self) -> Option<u8> {
        let irr = self.irr.highest()?;
        match self.isr.highest() {
            Some(isr) if irr >> 4 <= isr >> 4 => None,
            _ => Some(irr),
        }
    }

    /// The CPU takes the deliverable vector: IRR → ISR.
    pub fn ack(&mut self) -> Option<u8> {
        let v = self.deliverable()?;
        self.irr.set(v, false);
        self.isr.set(v, true);
        Some(v)
    }

    /// EOI: retires the highest in-service vector; returns it and whether it was level
    /// (then the LAPIC broadcasts the EOI to the IOAPICs).
    pub fn eoi(&mut self) -> Option<(u8, bool)> {
        let v = self.isr.highest()?;
        self.isr.set(v, false);
        Some((v, self.tmr.get(v)))
    }

    /// Whether `vector` is set in IRR (accepted, not yet taken).
    pub fn is_pending(&self, vector: u8) -> bool {
        self.irr.get(vector)
    }

    /// Fixed interrupts dropped because their vector was below 16 (a real LAPIC's illegal vector).
    pub fn illegal_vectors(&self) -> u64 {
        self.illegal_vectors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_class_preempts_lower_in_service() {
        let mut l = Lapic::default();
        l.accept(0x31, false);
        assert_eq!(l.ack(), Some(0x31));
        l.accept(0x35, false);
        assert_eq!(l.deliverable(), None, "same class waits for EOI");
        l.accept(0x41, false);
        assert_eq!(l.ack(), Some(0x41));
        assert_eq!(l.eoi(), Some((0x41, false)));
        assert_eq!(l.eoi(), Some((0x31, false)));
        assert_eq!(l.ack(), Some(0x35));
    }

    #[test]
    fn edge_vector_pending_twice_coalesces() {
        let mut l = Lapic::default();
        assert!(l.accept(0x40, false));
        assert!(!l.accept(0x40, false));
        assert_eq!(l.ack(), Some(0x40));
        assert_eq!(l.ack(), None);
    }

    #[test]
    fn level_vector_reports_level_at_eoi_and_illegal_vectors_drop() {
        let mut l = Lapic::default();
        assert!(!l.accept(3, false));
        assert_eq!(l.illegal_vectors(), 1);
        l.accept(0x60, true);
        l.ack();
        assert_eq!(l.eoi(), Some((0x60, true)));
        assert_eq!(l.eoi(), None);
    }
}
