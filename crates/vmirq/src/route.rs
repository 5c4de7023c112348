//! GSI routes and the routing table, with KVM's validation rules.
//!
//! Rules from Linux `virt/kvm/irqchip.c` (`setup_routing_entry`, `kvm_set_irq_routing`) and
//! `arch/x86/kvm/irq_comm.c` (`kvm_set_routing_entry`): at most 4096 GSIs; PIC pins < 8,
//! IOAPIC pins < 24 (here: < the configured pin count); one GSI may carry several IRQCHIP
//! entries only for different chips; any other entry must be alone on its GSI.

use std::collections::BTreeMap;
use std::fmt;

use thiserror::Error;

use crate::msi::MsiMessage;

/// Most GSIs a routing table may name (KVM_MAX_IRQ_ROUTES).
pub const MAX_GSIS: u32 = 4096;
/// IOAPIC pins KVM's in-kernel IOAPIC has, and the default for the userspace one.
pub const DEFAULT_IOAPIC_PINS: u32 = 24;
/// Pins of one 8259 PIC.
pub const PIC_PINS: u32 = 8;

/// A global system interrupt number: the index into the routing table.
///
/// A `Gsi` names a routing-table slot; it confers no ownership. The core's API never takes a
/// bare `Gsi` to route or bind: callers hold a [`crate::GsiRoute`] (a GSI they allocated) or an
/// [`crate::IoapicPin`] (a pin's fixed GSI). Backends receive `Gsi`s in [`crate::KernelRoute`]s
/// and irqfd calls, and [`Gsi::from_raw`] exists for them and their tests.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Gsi(pub(crate) u32);

impl Gsi {
    /// A GSI number as a backend or the hypervisor spells it. Holding the result owns nothing.
    pub const fn from_raw(gsi: u32) -> Self {
        Gsi(gsi)
    }

    /// The GSI number (the index the hypervisor's routing table uses).
    pub const fn raw(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Gsi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GSI {}", self.0)
    }
}

/// Which interrupt controller an IRQCHIP route drives.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum IrqChip {
    /// The master 8259 PIC (pins 0-7).
    PicMaster,
    /// The slave 8259 PIC (pins 0-7, GSIs 8-15).
    PicSlave,
    /// The IOAPIC.
    Ioapic,
}

/// Where a GSI's interrupt goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Route {
    /// A pin of an interrupt controller.
    Irqchip {
        /// The controller.
        chip: IrqChip,
        /// Its input pin.
        pin: u32,
    },
    /// An MSI message; `devid` is the requester ID for platforms that need it.
    Msi {
        /// Address and data.
        msg: MsiMessage,
        /// Requester ID (KVM_MSI_VALID_DEVID), if the platform needs one.
        devid: Option<u32>,
    },
    /// A Xen event channel port (KVM_IRQ_ROUTING_XEN_EVTCHN).
    XenEvtchn {
        /// The guest's event channel port.
        port: u32,
        /// The vCPU the port is bound to.
        vcpu: u32,
        /// FIFO priority (0 highest .. 15), or [`Route::XEN_PRIO_2LEVEL`]; the 2-level ABI
        /// ignores it.
        priority: u32,
    },
}

impl Route {
    /// KVM's `KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL` (`(u32)~0`), the only priority a KVM with
    /// `KVM_CAP_XEN_HVM` accepts (virt/kvm/xen.c `kvm_xen_setup_evtchn`): a VMM may hand vmirq
    /// the same routes it would give such a KVM.
    pub const XEN_PRIO_2LEVEL: u32 = u32::MAX;

    /// A route to IOAPIC pin `pin`.
    pub const fn ioapic(pin: u32) -> Self {
        Route::Irqchip {
            chip: IrqChip::Ioapic,
            pin,
        }
    }

    /// A route to the MSI `msg`, with no requester ID.
    pub const fn msi(msg: MsiMessage) -> Self {
        Route::Msi { msg, devid: None }
    }

    /// The IOAPIC pin this route drives, if it is an IOAPIC route.
    pub const fn ioapic_pin(&self) -> Option<u32> {
        match *self {
            Route::Irqchip {
                chip: IrqChip::Ioapic,
                pin,
            } => Some(pin),
            _ => None,
        }
    }
}

/// Errors from building or validating a routing table.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RouteError {
    /// KVM's sharing rule: only IRQCHIP routes of different chips may share a GSI.
    #[error("{gsi} already has a {existing:?} route; only IRQCHIP routes for different chips may share a GSI")]
    Conflict {
        /// The GSI.
        gsi: Gsi,
        /// The route it already has.
        existing: Route,
    },
    /// The GSI is past the table's end.
    #[error("{0} is beyond the {MAX_GSIS}-entry routing table")]
    GsiOutOfRange(Gsi),
    /// Split irqchip: the GSI carries an IOAPIC pin's kernel route.
    #[error("{gsi} is reserved for IOAPIC pin {} in split irqchip mode", gsi.0)]
    GsiReserved {
        /// The GSI.
        gsi: Gsi,
    },
    /// The controller has no such pin.
    #[error("{chip:?} has no pin {pin} (it has {pins})")]
    PinOutOfRange {
        /// The controller.
        chip: IrqChip,
        /// The pin asked for.
        pin: u32,
        /// Pins it has.
        pins: u32,
    },
    /// Xen priorities are 0..=15, or KVM's 2-level value ([`Route::XEN_PRIO_2LEVEL`]).
    #[error("Xen event channel priority {0} is not 0..=15 nor KVM's 2-level value (u32::MAX)")]
    XenPriority(u32),
}

/// An immutable routing table: GSI → the routes it fans out to.
///
/// Tables are built by [`crate::router::RouteBatch`] and published whole; nothing mutates a
/// published table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutingTable {
    entries: BTreeMap<Gsi, Vec<Route>>,
    ioapic_pins: u32,
}

impl RoutingTable {
    /// An empty table for an irqchip with `ioapic_pins` IOAPIC pins.
    pub fn new(ioapic_pins: u32) -> Self {
        Self {
            entries: BTreeMap::new(),
            ioapic_pins,
        }
    }

    /// Routes of `gsi` (empty if it has none).
    pub fn get(&self, gsi: Gsi) -> &[Route] {
        self.entries.get(&gsi).map_or(&[], Vec::as_slice)
    }

    /// Every (GSI, route) pair, in GSI order.
    pub fn iter(&self) -> impl Iterator<Item = (Gsi, &Route)> {
        self.entries
            .iter()
            .flat_map(|(gsi, routes)| routes.iter().map(move |r| (*gsi, r)))
    }

    /// Number of (GSI, route) entries.
    pub fn len(&self) -> usize {
        self.entries.values().map(Vec::len).sum()
    }

    /// Whether no GSI has a route.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds one route to `gsi`, enforcing KVM's rules.
    pub fn add(&mut self, gsi: Gsi, route: Route) -> Result<(), RouteError> {
        self.check(gsi, &route)?;
        let routes = self.entries.entry(gsi).or_default();
        for existing in routes.iter() {
            let shareable = matches!(
                (existing, &route),
                (Route::Irqchip { chip: a, .. }, Route::Irqchip { chip: b, .. }) if a != b
            );
            if !shareable {
                return Err(RouteError::Conflict {
                    gsi,
                    existing: *existing,
                });
            }
        }
        routes.push(route);
        Ok(())
    }

    /// Replaces every route of `gsi` with `route`.
    pub fn set(&mut self, gsi: Gsi, route: Route) -> Result<(), RouteError> {
        self.check(gsi, &route)?;
        self.entries.insert(gsi, vec![route]);
        Ok(())
    }

    /// Removes every route of `gsi`; returns whether it had any.
    pub fn remove(&mut self, gsi: Gsi) -> bool {
        self.entries.remove(&gsi).is_some()
    }

    fn check(&self, gsi: Gsi, route: &Route) -> Result<(), RouteError> {
        if gsi.0 >= MAX_GSIS {
            return Err(RouteError::GsiOutOfRange(gsi));
        }
        match *route {
            Route::Irqchip { chip, pin } => {
                let pins = match chip {
                    IrqChip::PicMaster | IrqChip::PicSlave => PIC_PINS,
                    IrqChip::Ioapic => self.ioapic_pins,
                };
                if pin >= pins {
                    return Err(RouteError::PinOutOfRange { chip, pin, pins });
                }
            }
            Route::XenEvtchn { priority, .. }
                if priority > 15 && priority != Route::XEN_PRIO_2LEVEL =>
            {
                return Err(RouteError::XenPriority(priority));
            }
            Route::Msi { .. } | Route::XenEvtchn { .. } => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pic_and_ioapic_pins_may_share_a_gsi() {
        let mut t = RoutingTable::new(24);
        t.add(
            Gsi(4),
            Route::Irqchip {
                chip: IrqChip::PicMaster,
                pin: 4,
            },
        )
        .unwrap();
        t.add(Gsi(4), Route::ioapic(4)).unwrap();
        assert_eq!(t.get(Gsi(4)).len(), 2);
    }

    #[test]
    fn duplicate_gsi_entries_are_refused() {
        let mut t = RoutingTable::new(24);
        t.add(Gsi(30), Route::msi(MsiMessage::new(0xFEE0_0000, 0x30)))
            .unwrap();
        let err = t
            .add(Gsi(30), Route::msi(MsiMessage::new(0xFEE0_0000, 0x31)))
            .unwrap_err();
        assert!(matches!(err, RouteError::Conflict { gsi: Gsi(30), .. }));
        t.add(Gsi(5), Route::ioapic(5)).unwrap();
        assert!(t.add(Gsi(5), Route::ioapic(6)).is_err(), "same chip twice");
    }

    #[test]
    fn bad_pins_and_gsis_are_refused() {
        let mut t = RoutingTable::new(24);
        assert_eq!(
            t.add(Gsi(1), Route::ioapic(24)),
            Err(RouteError::PinOutOfRange {
                chip: IrqChip::Ioapic,
                pin: 24,
                pins: 24
            })
        );
        let pic = Route::Irqchip {
            chip: IrqChip::PicSlave,
            pin: 8,
        };
        assert!(t.add(Gsi(1), pic).is_err());
        assert_eq!(
            t.add(Gsi(4096), Route::ioapic(1)),
            Err(RouteError::GsiOutOfRange(Gsi(4096)))
        );
        let xen = Route::XenEvtchn {
            port: 3,
            vcpu: 0,
            priority: 16,
        };
        assert_eq!(t.add(Gsi(40), xen), Err(RouteError::XenPriority(16)));
        assert!(t.is_empty());
    }

    #[test]
    fn a_gsi_displays_as_errors_name_it() {
        assert_eq!(Gsi::from_raw(42).to_string(), "GSI 42");
    }

    #[test]
    fn only_ioapic_routes_name_an_ioapic_pin() {
        assert_eq!(Route::ioapic(5).ioapic_pin(), Some(5));
        let pic = Route::Irqchip {
            chip: IrqChip::PicMaster,
            pin: 5,
        };
        assert_eq!(pic.ioapic_pin(), None);
        assert_eq!(
            Route::msi(MsiMessage::new(0xFEE0_0000, 0x30)).ioapic_pin(),
            None
        );
    }

    #[test]
    fn a_table_lists_what_it_holds() {
        let mut t = RoutingTable::new(24);
        assert!(t.is_empty() && t.iter().next().is_none());
        t.add(Gsi(3), Route::ioapic(3)).unwrap();
        t.add(
            Gsi(3),
            Route::Irqchip {
                chip: IrqChip::PicMaster,
                pin: 3,
            },
        )
        .unwrap();
        t.add(Gsi(40), Route::ioapic(7)).unwrap();
        assert!(!t.is_empty());
        assert_eq!(t.len(), 3);
        let listed: Vec<(Gsi, Route)> = t.iter().map(|(g, r)| (g, *r)).collect();
        assert_eq!(listed.len(), 3);
        assert_eq!(listed[2], (Gsi(40), Route::ioapic(7)), "in GSI order");
    }

    #[test]
    fn xen_priorities_stop_at_15() {
        let mut t = RoutingTable::new(24);
        let xen = |priority| Route::XenEvtchn {
            port: 1,
            vcpu: 0,
            priority,
        };
        t.set(Gsi(50), xen(15)).unwrap();
        assert_eq!(t.set(Gsi(50), xen(16)), Err(RouteError::XenPriority(16)));
        // KVM's KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL, and only that value above 15.
        t.set(Gsi(50), xen(Route::XEN_PRIO_2LEVEL)).unwrap();
        assert_eq!(
            t.set(Gsi(50), xen(u32::MAX - 1)),
            Err(RouteError::XenPriority(u32::MAX - 1))
        );
    }
}
