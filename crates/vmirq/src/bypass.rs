//! The IRQ bypass registry: producers of interrupts (a passthrough device's vector, a vhost
//! backend, an in-process device model) and their consumers (vmirq's routes and irqfds) register
//! under a token and never know about each other; when both sides of a token exist the registry
//! connects them, and when either goes it disconnects them (Linux `virt/lib/irqbypass.c`).
//!
//! Connecting runs, in order: producer `stop`, consumer `stop`, producer `add_consumer`,
//! consumer `add_producer` (the producer's is undone if it fails), consumer `start`, producer
//! `start`; disconnecting mirrors it. A failed connection fails the registration that
//! completed the pair, whose caller gets the error: nothing is registered by it (as in Linux),
//! and it is never only logged.
//!
//! Register and lookup are O(1) (a hash map of tokens; the first kernel version scanned lists).
//! Locks: `slots` (the map) is taken briefly to find or retire a token's slot; a slot's lock is
//! held across that token's connect and disconnect callbacks, so callbacks of one token never
//! interleave and an unregistration waits for a connect in progress. Lock order: `slots`, then
//! a slot (only to retire an empty one); registration never holds both. Callbacks must not
//! call back into the registry for their own token.

#[cfg(loom)]
use loom::sync::{Arc as SyncArc, Mutex, MutexGuard};
#[cfg(not(loom))]
use std::sync::{Arc as SyncArc, Mutex, MutexGuard};

use std::collections::HashMap;
use std::sync::Arc;

use thiserror::Error;

use crate::irqfd::EventfdId;

/// What a producer and a consumer meet by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Token {
    /// The eventfd the producer signals and the consumer binds: its identity, shared by every
    /// duplicate of it ([`Token::of_eventfd`]).
    Eventfd(u64),
    /// A key the VMM chooses.
    Key(u64),
}

impl Token {
    /// The token of the eventfd `fd`: the same for every descriptor `dup()`ed from it.
    pub fn of_eventfd(fd: &vmm_sys_util::eventfd::EventFd) -> Result<Self, crate::Error> {
        let EventfdId(id) = crate::irqfd::eventfd_id(std::os::fd::AsRawFd::as_raw_fd(fd))?;
        Ok(Token::Eventfd(id))
    }
}

/// Errors from registering.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum BypassError {
    /// The token already has a producer.
    #[error("{0:?} already has a producer")]
    DuplicateProducer(Token),
    /// The token already has a consumer.
    #[error("{0:?} already has a consumer")]
    DuplicateConsumer(Token),
    /// A side refused the connection (named in the message); nothing was registered.
    #[error("connecting the producer and consumer of {token:?} failed: {reason}")]
    Connect {
        /// The token.
        token: Token,
        /// Why, as the refusing side said.
        reason: String,
    },
}

/// The producing side of a token.
pub trait Producer: Send + Sync {
    /// Stop producing (a connect or disconnect is about to change where events go).
    fn stop(&self) {}
    /// Produce again.
    fn start(&self) {}
    /// Deliver to `consumer` from now on (once started); `Err` refuses, saying why.
    fn add_consumer(&self, consumer: &Arc<dyn Consumer>) -> Result<(), String>;
    /// `consumer` goes.
    fn del_consumer(&self, consumer: &Arc<dyn Consumer>);
}

/// The consuming side of a token.
pub trait Consumer: Send + Sync {
    /// Stop consuming.
    fn stop(&self) {}
    /// Consume again.
    fn start(&self) {}
    /// Take events from `producer`; `Err` refuses, saying why.
    fn add_producer(&self, producer: &Arc<dyn Producer>) -> Result<(), String>;
    /// `producer` goes.
    fn del_producer(&self, producer: &Arc<dyn Producer>);
}

/// One token's two sides.
#[derive(Default)]
struct Pair {
    producer: Option<Arc<dyn Producer>>,
    consumer: Option<Arc<dyn Consumer>>,
    /// Taken out of the map: a registration that finds it retired starts over.
    retired: bool,
}

type Slot = SyncArc<Mutex<Pair>>;

/// The registry: a handle, cheap to clone (clones share one registry). See the module docs.
#[derive(Clone)]
pub struct Registry {
    inner: SyncArc<Inner>,
}

struct Inner {
    slots: Mutex<HashMap<Token, Slot>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            inner: SyncArc::new(Inner {
                slots: Mutex::new(HashMap::new()),
            }),
        }
    }
}

/// Which side a registration holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Producer,
    Consumer,
}

/// A registration; dropping it disconnects (if connected) and unregisters.
#[must_use = "dropping the registration unregisters it"]
pub struct Registration {
    registry: Registry,
    token: Token,
    side: Side,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn connect(p: &Arc<dyn Producer>, c: &Arc<dyn Consumer>) -> Result<(), String> {
    p.stop();
    c.stop();
    let mut r = p.add_consumer(c);
    if r.is_ok() {
        r = c.add_producer(p);
        if r.is_err() {
            p.del_consumer(c);
        }
    }
    c.start();
    p.start();
    r
}

fn disconnect(p: &Arc<dyn Producer>, c: &Arc<dyn Consumer>) {
    p.stop();
    c.stop();
    c.del_producer(p);
    p.del_consumer(c);
    c.start();
    p.start();
}

impl Registry {
    /// An empty registry (one per VM, or one per VMM).
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `producer` under `token`, connecting it to the token's consumer if there is
    /// one. Refused if the token has a producer, or if the connection fails (then nothing is
    /// registered).
    pub fn register_producer(
        &self,
        token: Token,
        producer: Arc<dyn Producer>,
    ) -> Result<Registration, BypassError> {
        self.register(token, Side::Producer, |pair| {
            if pair.producer.is_some() {
                return Err(BypassError::DuplicateProducer(token));
            }
            if let Some(c) = &pair.consumer {
                connect(&producer, c).map_err(|reason| BypassError::Connect { token, reason })?;
            }
            pair.producer = Some(producer);
            Ok(())
        })
    }

    /// Registers `consumer` under `token`, connecting it to the token's producer if there is
    /// one. Refused if the token has a consumer, or if the connection fails.
    pub fn register_consumer(
        &self,
        token: Token,
        consumer: Arc<dyn Consumer>,
    ) -> Result<Registration, BypassError> {
        self.register(token, Side::Consumer, |pair| {
            if pair.consumer.is_some() {
                return Err(BypassError::DuplicateConsumer(token));
            }
            if let Some(p) = &pair.producer {
                connect(p, &consumer).map_err(|reason| BypassError::Connect { token, reason })?;
            }
            pair.consumer = Some(consumer);
            Ok(())
        })
    }

    /// Whether `token` has both sides (and so they are connected).
    pub fn is_connected(&self, token: Token) -> bool {
        let slot = lock(&self.inner.slots).get(&token).cloned();
        slot.is_some_and(|s| {
            let pair = lock(&s);
            pair.producer.is_some() && pair.consumer.is_some()
        })
    }

    /// Tokens with at least one side registered.
    pub fn len(&self) -> usize {
        lock(&self.inner.slots).len()
    }

    /// Whether no token is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn register(
        &self,
        token: Token,
        side: Side,
        add: impl FnOnce(&mut Pair) -> Result<(), BypassError>,
    ) -> Result<Registration, BypassError> {
        let mut add = Some(add);
        loop {
            let slot = SyncArc::clone(
                lock(&self.inner.slots)
                    .entry(token)
                    .or_insert_with(|| SyncArc::new(Mutex::new(Pair::default()))),
            );
            let mut pair = lock(&slot);
            if pair.retired {
                continue; // retired between the lookup and the lock: look again
            }
            let add = add
                .take()
                .expect("runs once: a retired slot was not added to");
            let added = add(&mut pair);
            let empty = pair.producer.is_none() && pair.consumer.is_none();
            drop(pair);
            if empty {
                self.retire_if_empty(token);
            }
            return added.map(|()| Registration {
                registry: self.clone(),
                token,
                side,
            });
        }
    }

    fn unregister(&self, token: Token, side: Side) {
        let Some(slot) = lock(&self.inner.slots).get(&token).cloned() else {
            return;
        };
        {
            let mut pair = lock(&slot);
            if let (Some(p), Some(c)) = (&pair.producer, &pair.consumer) {
                disconnect(p, c);
            }
            match side {
                Side::Producer => pair.producer = None,
                Side::Consumer => pair.consumer = None,
            }
        }
        self.retire_if_empty(token);
    }

    /// Takes `token`'s slot out of the map if neither side is registered.
    fn retire_if_empty(&self, token: Token) {
        let mut slots = lock(&self.inner.slots);
        let Some(slot) = slots.get(&token).cloned() else {
            return;
        };
        let mut pair = lock(&slot);
        if pair.producer.is_none() && pair.consumer.is_none() && !pair.retired {
            pair.retired = true;
            slots.remove(&token);
        }
    }
}

impl Registration {
    /// The token.
    pub fn token(&self) -> Token {
        self.token
    }

    /// Whether the other side is registered too (and connected).
    pub fn is_connected(&self) -> bool {
        self.registry.is_connected(self.token)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.unregister(self.token, self.side);
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("token", &self.token)
            .field("side", &self.side)
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_tests;
