//! The MSI-X message control word, vector table and pending bit array (PCI 3.0 §6.8.2).

use super::spec;
use crate::msi::MsiMessage;

pub use spec::{ENTRY_SIZE, MAX_VECTORS};

/// What changed for the vector manager, after one operation.
///
/// Each list is in ascending vector order and names a vector at most once. A vector appears in
/// at most one of `unmasked`, `masked` and `message_changed`, and when `disabled` is set all
/// three lists are empty. A vector that becomes deliverable appears only in `unmasked`, even if
/// the same write also changed its message: the manager reads the current message then.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct VectorEffects {
    /// Vectors that became deliverable (enabled && !function mask && !entry mask): the manager
    /// gives them a route+irqfd (lazily) and delivers their pending bit if set.
    pub unmasked: Vec<u16>,
    /// Vectors that stopped being deliverable (masked by entry or function mask): the manager
    /// deassigns their irqfd and starts latching into the PBA.
    pub masked: Vec<u16>,
    /// Deliverable vectors whose message (address/data) changed: the manager updates the route.
    pub message_changed: Vec<u16>,
    /// MSI-X was disabled (or reset): the manager releases every vector's resources.
    pub disabled: bool,
    /// The function was reset (enabled or not): the manager also discards what its vectors'
    /// eventfds counted before the reset, instead of latching it into the fresh PBA.
    pub reset: bool,
}

impl VectorEffects {
    /// Empties the lists and clears `disabled`, keeping the allocations for the next operation.
    pub fn clear(&mut self) {
        let Self {
            unmasked,
            masked,
            message_changed,
            disabled,
            reset,
        } = self;
        unmasked.clear();
        masked.clear();
        message_changed.clear();
        *disabled = false;
        *reset = false;
    }

    /// True when the operation left the manager nothing to do.
    pub fn is_empty(&self) -> bool {
        let Self {
            unmasked,
            masked,
            message_changed,
            disabled,
            reset,
        } = self;
        unmasked.is_empty()
            && masked.is_empty()
            && message_changed.is_empty()
            && !disabled
            && !reset
    }

    /// Records a change of one vector's deliverability or message.
    pub(super) fn record(
        &mut self,
        vector: u16,
        before: (bool, MsiMessage),
        after: (bool, MsiMessage),
    ) {
        match (before.0, after.0) {
            (false, true) => self.unmasked.push(vector),
            (true, false) => self.masked.push(vector),
            (true, true) if before.1 != after.1 => self.message_changed.push(vector),
            _ => {}
        }
    }
}

/// An MSI-X function's state in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixTableState {
    /// Per entry: address low, address high, data, vector control.
    pub entries: Vec<[u32; 4]>,
    /// The PBA's qwords.
    pub pba: Vec<u64>,
    /// MSI-X enable.
    pub enabled: bool,
    /// Function mask.
    pub function_mask: bool,
}

/// One 16-byte table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    address_lo: u32,
    address_hi: u32,
    data: u32,
    /// Only [`spec::VECTOR_CONTROL_MASK`] is ever set: reserved bits are not stored.
    vector_control: u32,
}

impl Entry {
    /// Power-on state: masked, everything else 0 (§6.8.2.9: "mask bit ... set to 1 after reset").
    const RESET: Self = Self {
        address_lo: 0,
        address_hi: 0,
        data: 0,
        vector_control: spec::VECTOR_CONTROL_MASK,
    };

    fn masked(&self) -> bool {
        self.vector_control & spec::VECTOR_CONTROL_MASK != 0
    }

    fn message(&self) -> MsiMessage {
        MsiMessage::new(
            u64::from(self.address_hi) << 32 | u64::from(self.address_lo),
            self.data,
        )
    }

    /// The dword at `offset` (a multiple of 4 below 16) inside the entry.
    fn dword(&self, offset: u64) -> u32 {
        match offset {
            spec::ENTRY_ADDRESS_LO => self.address_lo,
            spec::ENTRY_ADDRESS_HI => self.address_hi,
            spec::ENTRY_DATA => self.data,
            _ => self.vector_control,
        }
    }

    fn write_dword(&mut self, offset: u64, value: u32) {
        match offset {
            spec::ENTRY_ADDRESS_LO => self.address_lo = value,
            spec::ENTRY_ADDRESS_HI => self.address_hi = value,
            spec::ENTRY_DATA => self.data = value,
            // §6.8.2.9: only the mask bit is defined; reserved bits read 0.
            _ => self.vector_control = value & spec::VECTOR_CONTROL_MASK,
        }
    }
}

/// An MSI-X function's interrupt state: message control, vector table and PBA.
///
/// A pure state machine: guest accesses and the manager's pending-bit updates change it, and
/// each guest access reports in a [`VectorEffects`] which vectors the manager must (un)route.
/// The caller serializes all operations (one `Mutex` around the device's interrupt state).
///
/// One rule decides delivery, [`MsixTable::is_masked`]: a vector is deliverable when MSI-X is
/// enabled, the function mask is clear and its own mask bit is clear. Every effect is a change
/// of that predicate or of a deliverable vector's message.
///
/// Pending bits follow QEMU `hw/pci/msix.c`: the model never sets or clears them itself (the
/// manager latches and clears with [`MsixTable::set_pending`]); they survive masking and
/// disabling, and only [`MsixTable::reset`] clears them. QEMU treats "disabled" as one more
/// reason to mask (`msix_update_function_masked`), latches while disabled and fires pending
/// vectors on re-enable; `msix_reset` alone zeroes the PBA.
#[derive(Clone, Debug)]
pub struct MsixTable {
    entries: Box<[Entry]>,
    /// Pending bits, vector `v` at bit `v % 64` of qword `v / 64`; bits past the last vector stay 0.
    pba: Box<[u64]>,
    enabled: bool,
    function_mask: bool,
}

impl MsixTable {
    /// A function with `vectors` vectors, clamped to `1..=MAX_VECTORS`, in its power-on state:
    /// MSI-X disabled, function mask clear, every entry masked with address and data 0, PBA clear.
    pub fn new(vectors: u16) -> Self {
        let vectors = vectors.clamp(1, MAX_VECTORS);
        Self {
            entries: vec![Entry::RESET; usize::from(vectors)].into_boxed_slice(),
            pba: vec![0; (spec::pba_bytes(vectors) / 8) as usize].into_boxed_slice(),
            enabled: false,
            function_mask: false,
        }
    }

    /// Number of vectors (table entries): the table size N.
    pub fn vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Size of the vector table in its BAR.
    pub fn table_bytes(&self) -> u64 {
        u64::from(self.vectors()) * ENTRY_SIZE
    }

    /// Size of the PBA in its BAR: whole qwords.
    pub fn pba_bytes(&self) -> u64 {
        spec::pba_bytes(self.vectors())
    }

    /// The message control word: table size N - 1 (read-only), function mask, enable.
    pub fn message_control(&self) -> u16 {
        let mut value = self.vectors() - 1;
        if self.function_mask {
            value |= spec::MSIX_CTRL_FUNCTION_MASK;
        }
        if self.enabled {
            value |= spec::MSIX_CTRL_ENABLE;
        }
        value
    }

    /// A guest write to the message control word. Only enable and function mask are writable.
    ///
    /// Disabling reports only `disabled`. Otherwise every vector whose deliverability changed is
    /// listed, all in this one `fx`, so the manager can commit e.g. 2048 routes at once.
    pub fn write_message_control(&mut self, value: u16, fx: &mut VectorEffects) {
        let was_enabled = self.enabled;
        let was_open = self.is_open();
        self.enabled = value & spec::MSIX_CTRL_ENABLE != 0;
        self.function_mask = value & spec::MSIX_CTRL_FUNCTION_MASK != 0;
        if was_enabled && !self.enabled {
            fx.disabled = true;
            return;
        }
        let open = self.is_open();
        if open == was_open {
            return;
        }
        // Only vectors whose own mask bit is clear change: function mask and enable gate all.
        let list = if open {
            &mut fx.unmasked
        } else {
            &mut fx.masked
        };
        list.extend(
            self.entries
                .iter()
                .enumerate()
                .filter(|(_, e)| !e.masked())
                .map(|(v, _)| v as u16),
        );
    }

    /// Message control bit 15: MSI-X enable.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Message control bit 14: the function mask.
    pub fn function_masked(&self) -> bool {
        self.function_mask
    }

    /// A guest MMIO read at `offset` into the table. Never panics. Aligned dword and qword
    /// reads inside the table return the entry's fields (a qword is two dwords, little-endian);
    /// anything else reads all-ones (§6.8.2: other accesses are undefined).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        match self.table_access(offset, data.len()) {
            Some((vector, field)) => {
                let entry = &self.entries[usize::from(vector)];
                let lo = entry.dword(field);
                let value = if data.len() == 8 {
                    u64::from(lo) | u64::from(entry.dword(field + 4)) << 32
                } else {
                    u64::from(lo)
                };
                data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
            }
            None => data.fill(0xff),
        }
    }

    /// A guest MMIO write at `offset` into the table. Never panics. Aligned dword and qword
    /// writes inside the table update the entry; anything else is ignored. A qword at offset 8
    /// writes data and vector control together and reports one effect.
    pub fn table_write(&mut self, offset: u64, data: &[u8], fx: &mut VectorEffects) {
        let Some((vector, field)) = self.table_access(offset, data.len()) else {
            return;
        };
        let before = self.state(vector);
        let entry = &mut self.entries[usize::from(vector)];
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        entry.write_dword(
            field,
            u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        );
        if data.len() == 8 {
            entry.write_dword(
                field + 4,
                u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            );
        }
        // Linux only rewrites a message while its vector is masked; a guest that changes a
        // deliverable one gets its route updated anyway (QEMU vfio re-routes on any write).
        fx.record(vector, before, self.state(vector));
    }

    /// A guest MMIO read at `offset` into the PBA. Aligned dword and qword reads inside the
    /// PBA return the pending bits; anything else reads all-ones.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        if !aligned_access(offset, data.len(), self.pba_bytes()) {
            data.fill(0xff);
            return;
        }
        let qword = self.pba[(offset / 8) as usize];
        let bytes = qword.to_le_bytes();
        let start = (offset % 8) as usize;
        data.copy_from_slice(&bytes[start..start + data.len()]);
    }

    /// A guest MMIO write into the PBA: ignored, the PBA is read-only (§6.8.2.10).
    pub fn pba_write(&mut self, _offset: u64, _data: &[u8]) {}

    /// Whether `vector` is not deliverable: MSI-X disabled, function mask set, or its own mask
    /// bit set. Out-of-range vectors are masked.
    pub fn is_masked(&self, vector: u16) -> bool {
        !self.is_open() || self.entry_masked(vector)
    }

    /// The vector's own mask bit; out-of-range vectors are masked.
    pub fn entry_masked(&self, vector: u16) -> bool {
        self.entries
            .get(usize::from(vector))
            .is_none_or(Entry::masked)
    }

    /// The message the vector's entry holds, whatever its mask; `None` out of range.
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        self.entries.get(usize::from(vector)).map(Entry::message)
    }

    /// The vector's pending bit in the PBA; false out of range.
    pub fn is_pending(&self, vector: u16) -> bool {
        vector < self.vectors() && self.pba[usize::from(vector / 64)] & (1 << (vector % 64)) != 0
    }

    /// Sets or clears the vector's pending bit (the manager latches a masked vector's interrupt,
    /// and clears the bit once it delivered it). Out of range is ignored.
    pub fn set_pending(&mut self, vector: u16, pending: bool) {
        if vector >= self.vectors() {
            return;
        }
        let (word, bit) = (usize::from(vector / 64), 1u64 << (vector % 64));
        if pending {
            self.pba[word] |= bit;
        } else {
            self.pba[word] &= !bit;
        }
    }

    /// The vectors whose pending bit is set, ascending.
    pub fn pending_vectors(&self) -> impl Iterator<Item = u16> + '_ {
        self.pba.iter().enumerate().flat_map(|(word, &bits)| {
            (0..64u16)
                .filter(move |bit| bits & (1 << bit) != 0)
                .map(move |bit| word as u16 * 64 + bit)
        })
    }

    /// Back to the power-on state (QEMU `msix_reset`: control bits cleared, table zeroed and
    /// every entry masked, PBA zeroed). Reports `reset`, and `disabled` if MSI-X was enabled.
    pub fn reset(&mut self, fx: &mut VectorEffects) {
        let Self {
            entries,
            pba,
            enabled,
            function_mask,
        } = self;
        fx.reset = true;
        if *enabled {
            fx.disabled = true;
        }
        entries.fill(Entry::RESET);
        pba.fill(0);
        *enabled = false;
        *function_mask = false;
    }

    /// Everything the function holds, for a snapshot.
    pub fn save(&self) -> MsixTableState {
        let Self {
            entries,
            pba,
            enabled,
            function_mask,
        } = self;
        MsixTableState {
            entries: entries
                .iter()
                .map(|e| {
                    let Entry {
                        address_lo,
                        address_hi,
                        data,
                        vector_control,
                    } = *e;
                    [address_lo, address_hi, data, vector_control]
                })
                .collect(),
            pba: pba.to_vec(),
            enabled: *enabled,
            function_mask: *function_mask,
        }
    }

    /// The function as `state` saved it. Refused (`Err` naming why) if `state` has another
    /// vector count or bits no function holds (reserved vector-control bits, pending bits past
    /// the last vector).
    pub fn restore(state: &MsixTableState) -> Result<Self, String> {
        let MsixTableState {
            entries,
            pba,
            enabled,
            function_mask,
        } = state;
        let vectors = u16::try_from(entries.len())
            .ok()
            .filter(|n| (1..=MAX_VECTORS).contains(n))
            .ok_or_else(|| format!("{} MSI-X vectors", entries.len()))?;
        let mut table = Self::new(vectors);
        if pba.len() != table.pba.len() {
            return Err(format!("{} PBA qwords for {vectors} vectors", pba.len()));
        }
        for (n, e) in entries.iter().enumerate() {
            if e[3] & !spec::VECTOR_CONTROL_MASK != 0 {
                return Err(format!(
                    "entry {n}: reserved vector-control bits {:#x}",
                    e[3]
                ));
            }
            table.entries[n] = Entry {
                address_lo: e[0],
                address_hi: e[1],
                data: e[2],
                vector_control: e[3],
            };
        }
        for (word, bits) in pba.iter().enumerate() {
            let valid = usize::from(vectors).saturating_sub(word * 64).min(64);
            let mask = if valid == 64 {
                u64::MAX
            } else {
                (1u64 << valid) - 1
            };
            if bits & !mask != 0 {
                return Err(format!("pending bits past vector {vectors}"));
            }
            table.pba[word] = *bits;
        }
        table.enabled = *enabled;
        table.function_mask = *function_mask;
        Ok(table)
    }

    /// Enabled and not function-masked: entries decide for themselves.
    fn is_open(&self) -> bool {
        self.enabled && !self.function_mask
    }

    /// Deliverability and message of an in-range vector, for effect reporting.
    fn state(&self, vector: u16) -> (bool, MsiMessage) {
        let entry = &self.entries[usize::from(vector)];
        (self.is_open() && !entry.masked(), entry.message())
    }

    /// The (vector, field offset) an aligned dword or qword table access names, if valid.
    fn table_access(&self, offset: u64, len: usize) -> Option<(u16, u64)> {
        aligned_access(offset, len, self.table_bytes())
            .then_some(((offset / ENTRY_SIZE) as u16, offset % ENTRY_SIZE))
    }
}

/// §6.8.2: table and PBA take aligned full dword or aligned full qword accesses, and this one
/// must lie inside a region of `size` bytes.
fn aligned_access(offset: u64, len: usize, size: u64) -> bool {
    matches!(len, 4 | 8)
        && offset % len as u64 == 0
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= size)
}
