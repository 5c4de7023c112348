//! Model checks of registration (`RUSTFLAGS="--cfg loom" cargo test -p vmirq --lib loom`):
//! concurrent register and unregister of both sides never leave a pair half connected, and
//! every connection is undone exactly once.

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;

use super::*;

/// Counts connections the consumer holds (added minus deleted).
struct Count(SyncArc<AtomicUsize>);

impl Producer for Count {
    fn add_consumer(&self, _: &Arc<dyn Consumer>) -> Result<(), String> {
        Ok(())
    }
    fn del_consumer(&self, _: &Arc<dyn Consumer>) {}
}

impl Consumer for Count {
    fn add_producer(&self, _: &Arc<dyn Producer>) -> Result<(), String> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn del_producer(&self, _: &Arc<dyn Producer>) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[test]
fn loom_a_pair_registered_and_dropped_concurrently_is_connected_iff_both_remain() {
    loom::model(|| {
        let reg = Registry::new();
        let held = SyncArc::new(AtomicUsize::new(0));
        let token = Token::Key(1);
        let (r1, h1) = (reg.clone(), held.clone());
        // The producer comes and goes while the consumer registers.
        let producer = thread::spawn(move || {
            let p = r1.register_producer(token, Arc::new(Count(h1))).unwrap();
            drop(p);
        });
        let consumer = reg
            .register_consumer(token, Arc::new(Count(held.clone())))
            .unwrap();
        producer.join().unwrap();
        assert!(!reg.is_connected(token));
        assert_eq!(held.load(Ordering::SeqCst), 0, "a connection left behind");
        drop(consumer);
        assert!(reg.is_empty(), "a slot left behind");
    });
}

#[test]
fn loom_a_token_retired_while_another_registration_arrives_is_found_again() {
    loom::model(|| {
        let reg = Registry::new();
        let held = SyncArc::new(AtomicUsize::new(0));
        let token = Token::Key(2);
        let first = reg
            .register_consumer(token, Arc::new(Count(held.clone())))
            .unwrap();
        let (r1, h1) = (reg.clone(), held.clone());
        let producer =
            thread::spawn(move || r1.register_producer(token, Arc::new(Count(h1))).unwrap());
        // The consumer leaves (retiring the slot if it is empty) while the producer arrives.
        drop(first);
        let p = producer.join().unwrap();
        let again = reg
            .register_consumer(token, Arc::new(Count(held.clone())))
            .unwrap();
        assert!(
            reg.is_connected(token),
            "the producer was lost in a retired slot"
        );
        assert_eq!(held.load(Ordering::SeqCst), 1);
        drop((p, again));
        assert!(reg.is_empty());
    });
}
