//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the same checks the fuzz
//! targets run, so inputs that once found a problem keep being tried in every `cargo test`.

#[path = "../fuzz/checks.rs"]
mod checks;

/// A fuzz target's check.
type Check = fn(&[u8]);

#[test]
fn committed_fuzz_corpus_replays_cleanly() -> anyhow::Result<()> {
    let targets: [(&str, Check); 5] = [
        ("request", checks::request),
        ("response", checks::response),
        ("settings", checks::settings),
        ("name", checks::name),
        ("block", checks::block),
    ];
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, check) in targets {
        let mut count = 0;
        for entry in std::fs::read_dir(base.join(target))? {
            let path = entry?.path();
            check(&std::fs::read(&path)?);
            count += 1;
        }
        assert!(count > 0, "no corpus for {target}");
    }
    Ok(())
}
