//! MSI decoding: any address/data pair decodes to a message that encodes back to itself, or to
//! a typed error; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmirq::{MsiMessage, X86Msi};

fuzz_target!(|input: (u64, u32)| {
    let msg = MsiMessage::new(input.0, input.1);
    let Ok(decoded) = msg.decode() else {
        return;
    };
    let again = decoded.encode().expect("a decoded message encodes");
    assert_eq!(
        X86Msi::decode(again),
        Ok(decoded),
        "decode . encode . decode"
    );
    assert_eq!(again.is_level(), decoded.trigger_level);
});
