//! Check functions for the fuzz targets in `fuzz/` (`cargo +nightly fuzz run table_decode`), compiled for tests
//! and with the `fuzzing` feature. Each takes the fuzzer's bytes and panics on a broken property; the corpus
//! replay test below runs every checked-in input through the same function on stable.

use crate::shard::{IndexDoc, MAX_SHARD_BYTES, Previous, assemble, render};
use crate::{Table, TableError};
use sha2::{Digest, Sha256};

/// Index + shard decoding and assembly, and the `--tables FILE` format.
///
/// Input: one flag byte, then NUL-separated pieces: the first is read as an index document (and as a table file),
/// the others as the shards' data strings (an empty piece is a missing shard). Flag bit 0 replaces each shard
/// digest in the index by the digest of the piece given for it, so the fuzzer gets past the digest check (it can
/// never forge SHA-256) and reaches the shard parsing and the cross-checks behind it.
///
/// Properties: nothing panics; whatever is accepted validates, survives a JSON round trip, and renders back
/// (`render` → `IndexDoc::parse` + `assemble`) to the same table.
pub fn table_decode(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else { return };
    let mut pieces = rest.split(|&b| b == 0).map(std::str::from_utf8);
    let Some(Ok(first)) = pieces.next() else { return };
    let shards: Vec<Option<&str>> = pieces.map(|p| p.ok().filter(|s| !s.is_empty())).collect();

    if let Ok(t) = Table::from_json(first, "fuzz") {
        assert_eq!(t.validate("fuzz"), Ok(()));
        assert_eq!(Table::from_json(&t.to_json(), "again").as_ref(), Ok(&t), "table file round trip");
        round_trip(&t, usize::from(flags) * 16 + 200, flags & 2 == 2);
    }
    let Ok(mut index) = IndexDoc::parse(first, "fuzz index") else { return };
    let json = serde_json::to_string(&index).expect("serialisable");
    assert_eq!(IndexDoc::parse(&json, "again").as_ref(), Ok(&index), "index round trip");
    if flags & 1 == 1 {
        for (r, s) in index.shards.iter_mut().zip(&shards) {
            if let Some(s) = s {
                r.sha256 = hex::encode(Sha256::digest(s.as_bytes()));
            }
        }
    }
    let Ok(table) = assemble(&index, &shards) else { return };
    assert_eq!(table.validate("assembled"), Ok(()));
    assert_eq!(table.revision, index.revision);
    assert_eq!(table.service, index.service);
    assert_eq!(table.clients.len(), index.shards.iter().map(|r| r.clients).sum::<usize>());
    round_trip(&table, MAX_SHARD_BYTES, flags & 4 == 4);
}

/// `render` then read back: the index parses to what was rendered and the shards assemble to `table`, and not
/// without its last shard; rendered again after itself (given the previous table if `with_table`), nothing is
/// written and the index names the same shards. A render may only fail for size (a client larger than a shard, too
/// many shards).
pub fn round_trip(table: &Table, max_bytes: usize, with_table: bool) {
    let rendered = match render(table, "portcullis-table-fuzz", Previous::NONE, 7, max_bytes) {
        Ok(r) => r,
        Err(
            TableError::ClientTooLarge { .. } | TableError::TooManyShards { .. } | TableError::ShardOverhead { .. },
        ) => return,
        Err(e) => panic!("a valid table failed to render: {e}"),
    };
    assert_eq!(IndexDoc::parse(&rendered.index_json, "rendered").as_ref(), Ok(&rendered.index));
    let mut shards: Vec<Option<&str>> = rendered.shards.iter().map(|(_, s)| Some(s.as_str())).collect();
    assert_eq!(assemble(&rendered.index, &shards).as_ref(), Ok(table), "render → assemble");
    for (name, s) in &rendered.shards {
        assert!(s.len() <= max_bytes, "shard {name} is {} bytes, over the budget {max_bytes}", s.len());
    }
    if let Some(last) = shards.last_mut() {
        *last = None;
        assert!(assemble(&rendered.index, &shards).is_err(), "assembled without its last shard");
    }
    let previous = Previous::of(Some(&rendered.index), with_table.then_some(table));
    let again = render(table, "portcullis-table-fuzz", previous, 8, max_bytes).expect("rendered before");
    assert!(again.shards.is_empty(), "an unchanged table rewrote shards");
    assert_eq!(again.index.shards, rendered.index.shards);
}

/// The directory of a target's checked-in corpus (`fuzz/corpus/<target>`), for the replay tests.
pub fn corpus_dir(target: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target)
}

/// Runs `check` over every file of a target's corpus; panics (naming the file) if the corpus is missing or empty.
pub fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = corpus_dir(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        if let Err(e) = std::panic::catch_unwind(|| check(&data)) {
            panic!("{} fails its check: {e:?}", f.display());
        }
    }
    files.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every checked-in input of the `table_decode` fuzz target still passes (a regression test for what the
    /// fuzzer found, and a smoke test of the check itself).
    /// Found by the `table_decode` target (fuzz/corpus/table_decode/crash-ca67…): a table without clients whose
    /// service name and revision alone exceed the shard budget rendered one shard over that budget.
    #[test]
    fn render_refuses_a_budget_below_the_shard_overhead() {
        let t = Table::new(format!("team-a/{}", "x".repeat(300)), Default::default(), Vec::<crate::Client>::new());
        match render(&t, "portcullis-table-x", Previous::NONE, 1, 232) {
            Err(TableError::ShardOverhead { bytes, max: 232, .. }) => assert!(bytes > 232),
            other => panic!("{other:?}"),
        }
        let r = render(&t, "portcullis-table-x", Previous::NONE, 1, 1000).expect("fits");
        assert!(r.shards.iter().all(|(_, s)| s.len() <= 1000));
    }

    #[test]
    fn table_decode_corpus_replays() {
        assert!(replay("table_decode", table_decode) > 0);
    }
}
