use std::sync::mpsc;

use super::*;

/// Records every callback, in order, as "p.stop", "c.add" and so on.
#[derive(Default)]
struct Log(std::sync::Mutex<Vec<String>>);

impl Log {
    fn push(&self, what: &str) {
        self.0.lock().unwrap().push(what.to_owned());
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

struct P {
    log: Arc<Log>,
    refuse: bool,
}

impl Producer for P {
    fn stop(&self) {
        self.log.push("p.stop");
    }
    fn start(&self) {
        self.log.push("p.start");
    }
    fn add_consumer(&self, _: &Arc<dyn Consumer>) -> Result<(), String> {
        self.log.push("p.add");
        if self.refuse {
            return Err("producer refuses".into());
        }
        Ok(())
    }
    fn del_consumer(&self, _: &Arc<dyn Consumer>) {
        self.log.push("p.del");
    }
}

struct C {
    log: Arc<Log>,
    refuse: bool,
    /// Blocks `add_producer` until told to go on (after saying it started).
    gate: Option<(mpsc::Sender<()>, std::sync::Mutex<mpsc::Receiver<()>>)>,
}

impl Consumer for C {
    fn stop(&self) {
        self.log.push("c.stop");
    }
    fn start(&self) {
        self.log.push("c.start");
    }
    fn add_producer(&self, _: &Arc<dyn Producer>) -> Result<(), String> {
        if let Some((started, go)) = &self.gate {
            started.send(()).unwrap();
            go.lock().unwrap().recv().unwrap();
        }
        self.log.push("c.add");
        if self.refuse {
            return Err("consumer refuses".into());
        }
        Ok(())
    }
    fn del_producer(&self, _: &Arc<dyn Producer>) {
        self.log.push("c.del");
    }
}

fn p(log: &Arc<Log>) -> Arc<dyn Producer> {
    Arc::new(P {
        log: log.clone(),
        refuse: false,
    })
}

fn c(log: &Arc<Log>) -> Arc<dyn Consumer> {
    Arc::new(C {
        log: log.clone(),
        refuse: false,
        gate: None,
    })
}

#[test]
fn a_pair_connects_and_disconnects_in_the_kernels_order() {
    let reg = Registry::new();
    let log = Arc::new(Log::default());
    let token = Token::Key(7);
    let producer = reg.register_producer(token, p(&log)).unwrap();
    assert!(log.take().is_empty(), "nothing to connect to yet");
    assert!(!producer.is_connected());
    let consumer = reg.register_consumer(token, c(&log)).unwrap();
    assert_eq!(
        log.take(),
        ["p.stop", "c.stop", "p.add", "c.add", "c.start", "p.start"]
    );
    assert!(producer.is_connected() && consumer.is_connected());
    drop(consumer);
    assert_eq!(
        log.take(),
        ["p.stop", "c.stop", "c.del", "p.del", "c.start", "p.start"]
    );
    assert!(!producer.is_connected());
    // A new consumer connects to the same producer.
    let _again = reg.register_consumer(token, c(&log)).unwrap();
    assert_eq!(log.take().len(), 6);
    drop(producer);
    assert_eq!(log.take().len(), 6, "the producer's drop disconnects");
}

#[test]
fn a_second_producer_or_consumer_of_a_token_is_a_typed_error() {
    let reg = Registry::new();
    let log = Arc::new(Log::default());
    let token = Token::Key(1);
    let _p = reg.register_producer(token, p(&log)).unwrap();
    let _c = reg.register_consumer(token, c(&log)).unwrap();
    log.take();
    assert_eq!(
        reg.register_producer(token, p(&log)).unwrap_err(),
        BypassError::DuplicateProducer(token)
    );
    assert_eq!(
        reg.register_consumer(token, c(&log)).unwrap_err(),
        BypassError::DuplicateConsumer(token)
    );
    assert!(
        log.take().is_empty(),
        "a refused duplicate touched the pair"
    );
    assert!(reg.is_connected(token));
}

#[test]
fn a_failed_connection_is_returned_undone_and_registers_nothing() {
    let reg = Registry::new();
    let log = Arc::new(Log::default());
    let token = Token::Key(2);
    let _p = reg.register_producer(token, p(&log)).unwrap();
    let refusing = Arc::new(C {
        log: log.clone(),
        refuse: true,
        gate: None,
    });
    let err = reg.register_consumer(token, refusing).unwrap_err();
    assert!(
        matches!(err, BypassError::Connect { token: t, .. } if t == token),
        "{err}"
    );
    // The producer's half is undone, and both sides are started again.
    assert_eq!(
        log.take(),
        ["p.stop", "c.stop", "p.add", "c.add", "p.del", "c.start", "p.start"]
    );
    assert!(!reg.is_connected(token));
    // Nothing was registered: a consumer that accepts takes the token.
    let _c = reg.register_consumer(token, c(&log)).unwrap();
    assert!(reg.is_connected(token));
    // A refusing producer: the consumer is never asked.
    log.take();
    let other = Token::Key(3);
    let _c2 = reg.register_consumer(other, c(&log)).unwrap();
    let refusing = Arc::new(P {
        log: log.clone(),
        refuse: true,
    });
    assert!(reg.register_producer(other, refusing).is_err());
    assert_eq!(
        log.take(),
        ["p.stop", "c.stop", "p.add", "c.start", "p.start"]
    );
}

#[test]
fn unregistering_during_a_connect_waits_for_it_then_disconnects() {
    let reg = Registry::new();
    let log = Arc::new(Log::default());
    let token = Token::Key(4);
    let producer = reg.register_producer(token, p(&log)).unwrap();
    let (started_tx, started) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    let gated = Arc::new(C {
        log: log.clone(),
        refuse: false,
        gate: Some((started_tx, std::sync::Mutex::new(go_rx))),
    });
    let connecting = {
        let reg = reg.clone();
        std::thread::spawn(move || reg.register_consumer(token, gated))
    };
    started.recv().unwrap(); // the consumer is inside add_producer
                             // The producer leaves while the connect is inside the consumer's callback; the log's
                             // order shows its disconnect waited for the connect to end.
    let dropping = std::thread::spawn(move || drop(producer));
    go.send(()).unwrap();
    let consumer = connecting.join().unwrap().unwrap();
    dropping.join().unwrap();
    assert_eq!(
        log.take(),
        [
            "p.stop", "c.stop", "p.add", "c.add", "c.start", "p.start", // connect
            "p.stop", "c.stop", "c.del", "p.del", "c.start", "p.start", // then disconnect
        ]
    );
    assert!(!consumer.is_connected());
}

#[test]
fn an_eventfds_duplicates_share_its_token() {
    let fd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    let dup = fd.try_clone().unwrap();
    let other = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    let token = Token::of_eventfd(&fd).unwrap();
    assert_eq!(Token::of_eventfd(&dup).unwrap(), token);
    assert_ne!(Token::of_eventfd(&other).unwrap(), token);
}

#[test]
fn many_tokens_register_and_retire() {
    let reg = Registry::new();
    let log = Arc::new(Log::default());
    let pairs: Vec<_> = (0..10_000u64)
        .map(|k| {
            let t = Token::Key(k);
            (
                reg.register_producer(t, p(&log)).unwrap(),
                reg.register_consumer(t, c(&log)).unwrap(),
            )
        })
        .collect();
    assert_eq!(reg.len(), 10_000);
    assert!(pairs.iter().all(|(p, _)| p.is_connected()));
    drop(pairs);
    assert!(reg.is_empty(), "every token's slot is retired");
}
