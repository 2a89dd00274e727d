//! `Catalog::parse_messages` / `parse_abtests` on arbitrary bytes: never panic.
#![no_main]

use leanplum_segment_agent::leanplum::catalog::Catalog;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let messages = Catalog::parse_messages(data);
    let abtests = Catalog::parse_abtests(data);
    if let (Ok(m), Ok(a)) = (messages, abtests) {
        let (nm, na) = (m.len(), a.len());
        let catalog = Catalog::from_parts(m, a);
        assert!(catalog.len_messages() <= nm && catalog.len_abtests() <= na);
    }
});
