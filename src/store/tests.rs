use super::displaced::prune_displaced_to;
use super::*;
use std::os::unix::fs::symlink;

fn name(s: &str) -> FilePath {
    FilePath::new(s).unwrap()
}

fn not_found<T>(r: Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::NotFound(_)))
}

/// A download in progress in chunks serves pieces of the chunks it holds, and one in
/// pieces serves chunks of the pieces it holds; each checks the whole units it reads, so a
/// damaged byte costs the chunk it is in (or, in pieces, only its piece).
#[test]
fn a_download_in_either_unit_serves_chunks_and_pieces_of_what_it_holds() {
    use crate::model::manifest::piece_size_for;
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
        .collect();
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("src"), &data).unwrap();
    let file = File::open(src.path().join("src")).unwrap();
    let (m, fine) = Manifest::of_file_with_pieces(&file, data.len() as u64).unwrap();
    let fine = fine.unwrap();
    let (cs, ps) = (m.chunk_size(), fine.chunk_size());
    assert_eq!((cs, piece_size_for(m.size())), (64 << 10, Some(16 << 10)));
    let x = name("x.bin");
    for (unit, manifest) in [("chunks", &m), ("pieces", &fine)] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let b3 = m.blake3();
        let target = dir.path().join("x.bin");
        let partial = PartialFile::create(&target, &download_tag(&b3), m.size()).unwrap();
        partial.share(manifest, &[]).unwrap();
        // Chunk 1 written and marked, in the download's unit.
        partial
            .write_at(cs, &data[cs as usize..2 * cs as usize])
            .unwrap();
        let per = (cs / manifest.chunk_size()) as u32;
        (per..2 * per).for_each(|i| partial.mark_verified(i));
        let read = |offset: u64, len: u64| store.read_version(&x, &b3, offset, len as u32);
        let bytes = |offset: u64, len: u64| &data[offset as usize..(offset + len) as usize];
        assert_eq!(read(cs, cs).unwrap(), bytes(cs, cs), "{unit}: the chunk");
        assert_eq!(
            read(cs + ps, ps).unwrap(),
            bytes(cs + ps, ps),
            "{unit}: a piece"
        );
        assert!(
            matches!(read(2 * cs, ps), Err(StoreError::NotHeld { .. })),
            "{unit}: a piece not held"
        );
        assert!(
            matches!(read(cs + ps / 2, ps), Err(StoreError::NotAChunk { .. })),
            "{unit}: not a piece's start"
        );
        assert!(
            matches!(read(cs, 2 * cs), Err(StoreError::NotAChunk { .. })),
            "{unit}: longer than a chunk"
        );
        // A byte of its second piece damaged on disk.
        let mut bad = bytes(cs + ps, ps).to_vec();
        bad[7] ^= 0xff;
        partial.write_at(cs + ps, &bad).unwrap();
        assert!(matches!(read(cs + ps, ps), Err(StoreError::NotHeld { .. })));
        let first_piece = read(cs, ps);
        match unit {
            "chunks" => assert!(matches!(first_piece, Err(StoreError::NotHeld { .. }))),
            _ => assert_eq!(first_piece.unwrap(), bytes(cs, ps)),
        }
    }
}

#[test]
fn eighty_downloads_in_progress_stay_in_the_header_cache() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut partials = Vec::new();
    for i in 0..80u32 {
        let data = i.to_le_bytes().repeat(20_000);
        let m = Manifest::from_reader(&data[..], data.len() as u64).unwrap();
        let target = dir.path().join(format!("f{i}.bin"));
        let p = PartialFile::create_sparse(&target, &download_tag(&m.blake3()), m.size());
        let p = p.unwrap();
        p.share(&m, &[]).unwrap();
        partials.push(p);
    }
    assert_eq!(store.held_all().unwrap().len(), 80);
    // Every header read once is kept: listing again reads none (the cache held 64 and was
    // cleared when full, so each listing of more than 64 read every header again).
    assert_eq!(store.lock_held().entries.len(), 80);
    assert_eq!(store.held_all().unwrap().len(), 80);
    assert_eq!(store.lock_held().entries.len(), 80);
}

#[test]
fn displaced_versions_are_capped_in_all_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join(DISPLACED_DIR);
    fs::create_dir(&keep).unwrap();
    // 20 names with 2 versions each is under the per-name cap, over a cap of 30 in all.
    for v in 0..2 {
        for n in 0..20 {
            fs::write(keep.join(format!("n{n}.txt.{v:016x}")), b"x").unwrap();
            // Past the file system's timestamp tick (a few ms), so no two share a ctime.
            std::thread::sleep(std::time::Duration::from_millis(12));
        }
    }
    prune_displaced_to(&keep, "n0.txt", (30, u64::MAX));
    let left: Vec<String> = fs::read_dir(&keep)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 30);
    // The ten oldest went: the first versions of n0..n9.
    for n in 0..10 {
        assert!(!left.contains(&format!("n{n}.txt.{:016x}", 0)), "{left:?}");
    }
    // Bytes too: a cap of 5 bytes leaves 5 files of one byte.
    prune_displaced_to(&keep, "n0.txt", (usize::MAX, 5));
    assert_eq!(fs::read_dir(&keep).unwrap().count(), 5);
}

#[test]
fn a_shared_download_offers_only_verified_chunks_and_stops_once_committed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = Store::open(d).unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let m = Manifest::from_reader(&data[..], data.len() as u64).unwrap();
    let b3 = m.blake3();
    let target = d.join("x.bin");
    let partial = PartialFile::create(&target, &download_tag(&b3), m.size()).unwrap();
    let (x, cs) = (name("x.bin"), m.chunk_size());
    // Not shared yet: nothing is offered.
    assert!(store.held(&x, &b3).unwrap().is_none());
    partial.share(&m, &[]).unwrap();
    let held = store.held(&x, &b3).unwrap().unwrap();
    assert_eq!((held.chunks.count(), held.bytes()), (0, 0));
    // Chunk 1 written and marked; chunk 2 written but not marked.
    for i in [1u32, 2] {
        let off = m.chunk_offset(i);
        let len = m.chunk_len(i).unwrap();
        partial
            .write_at(off, &data[off as usize..(off + len) as usize])
            .unwrap();
    }
    partial.mark_verified(1);
    let listed = store.held_all().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].0.as_str(), listed[0].1.bytes()), ("x.bin", cs));
    assert_eq!(
        store
            .held_any(&x)
            .unwrap()
            .unwrap()
            .chunks
            .iter()
            .collect::<Vec<_>>(),
        [1]
    );
    let got = store.read_version(&x, &b3, cs, cs as u32).unwrap();
    assert_eq!(got, data[cs as usize..2 * cs as usize]);
    assert!(matches!(
        store.read_version(&x, &b3, 2 * cs, cs as u32),
        Err(StoreError::NotHeld { chunk: 2, .. })
    ));
    assert!(matches!(
        store.read_version(&x, &b3, 1, cs as u32),
        Err(StoreError::NotAChunk { .. })
    ));
    // Its bytes changed on disk since: refused, not served.
    partial.write_at(cs, b"garbage").unwrap();
    assert!(matches!(
        store.read_version(&x, &b3, cs, cs as u32),
        Err(StoreError::NotHeld { .. })
    ));
    assert!(store.list().unwrap().is_empty(), "never listed whole");
    // Committed: served whole, the sidecar gone.
    partial.write_at(0, &data).unwrap();
    partial.commit(b3, Check::Reread).unwrap();
    assert!(store.held_all().unwrap().is_empty());
    let got = store.read_version(&x, &b3, 2 * cs, cs as u32).unwrap();
    assert_eq!(got, data[2 * cs as usize..3 * cs as usize]);
    assert_eq!(fs::read_dir(d).unwrap().count(), 1, "{:?}", leftovers(d));
}

fn leftovers(d: &Path) -> Vec<String> {
    fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn lists_only_regular_files_with_valid_names() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::write(d.join("b.txt"), b"bee").unwrap();
    fs::write(d.join("a.txt"), b"a").unwrap();
    fs::write(d.join(".hidden"), b"x").unwrap();
    fs::write(d.join(".a.txt.1234.part"), b"x").unwrap();
    fs::create_dir(d.join("sub")).unwrap();
    let outside = tempfile::NamedTempFile::new().unwrap();
    symlink(outside.path(), d.join("link.txt")).unwrap();
    let store = Store::open(d).unwrap();
    let listed: Vec<_> = store
        .list()
        .unwrap()
        .into_iter()
        .map(|(n, m)| (n.to_string(), m.size()))
        .collect();
    assert_eq!(listed, [("a.txt".to_string(), 1), ("b.txt".to_string(), 3)]);
    assert!(not_found(store.manifest(&name("link.txt"))));
    assert!(not_found(store.read_range(&name("link.txt"), 0, 1)));
}

#[test]
fn a_changed_file_gets_a_new_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    fs::write(dir.path().join("f"), b"one").unwrap();
    let first = store.manifest(&name("f")).unwrap();
    assert_eq!(first.blake3(), *blake3::hash(b"one").as_bytes());
    fs::write(dir.path().join("f"), b"two").unwrap();
    assert_eq!(
        store.manifest(&name("f")).unwrap().blake3(),
        *blake3::hash(b"two").as_bytes()
    );
}

#[test]
fn ranges_outside_the_file_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("f"), b"0123456789").unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.read_range(&name("f"), 2, 3).unwrap(), b"234");
    assert!(matches!(
        store.read_range(&name("f"), 8, 3),
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(matches!(
        store.read_range(&name("f"), u64::MAX, 3),
        Err(StoreError::OutOfRange { .. })
    ));
}

#[test]
fn partial_files_appear_only_when_verified_and_never_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out.txt");
    let data = b"hello partial world";
    let hash = *blake3::hash(data).as_bytes();

    // Dropped without commit: nothing remains.
    let p = PartialFile::create(&target, "t", data.len() as u64).unwrap();
    p.write_at(0, data).unwrap();
    drop(p);
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);

    // Wrong bytes: refused, nothing appears.
    let p = PartialFile::create(&target, "t", data.len() as u64).unwrap();
    p.write_at(0, b"hello partial w0rld").unwrap();
    assert!(matches!(
        p.commit(hash, Check::Reread),
        Err(StoreError::Corrupt { .. })
    ));
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);

    // Right bytes, written out of order: stored.
    let p = PartialFile::create(&target, "t", data.len() as u64).unwrap();
    assert!(matches!(
        PartialFile::create(&target, "t", 1),
        Err(StoreError::Busy(_))
    ));
    p.write_at(6, &data[6..]).unwrap();
    p.write_at(0, &data[..6]).unwrap();
    assert!(p.write_at(10, &data[..]).is_err(), "past the end");
    assert_eq!(p.commit(hash, Check::Reread).unwrap(), Committed::Stored);
    assert_eq!(fs::read(&target).unwrap(), data);
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

    // Same again: already present. Different: conflict, and the original is untouched.
    let p = PartialFile::create(&target, "u", data.len() as u64).unwrap();
    p.write_at(0, data).unwrap();
    assert_eq!(
        p.commit(hash, Check::Reread).unwrap(),
        Committed::AlreadyPresent
    );
    let other = b"something else entirely";
    let p = PartialFile::create(&target, "v", other.len() as u64).unwrap();
    p.write_at(0, other).unwrap();
    assert!(matches!(
        p.commit(*blake3::hash(other).as_bytes(), Check::Reread),
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(fs::read(&target).unwrap(), data);
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn aligned_direct_writes_and_buffered_writes_make_one_correct_file() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("mixed");
    let data: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i % 253) as u8).collect();
    let p = PartialFile::create(&target, "t", data.len() as u64).unwrap();
    // A page-aligned copy of the first two pages (direct path where supported) ...
    let mut buf = vec![0u8; 2 * 4096 + 4096];
    let start = buf.as_ptr().align_offset(4096);
    buf[start..start + 8192].copy_from_slice(&data[..8192]);
    p.write_at(0, &buf[start..start + 8192]).unwrap();
    // ... and an unaligned tail (buffered path).
    p.write_at(8192, &data[8192..]).unwrap();
    let hash = *blake3::hash(&data).as_bytes();
    assert_eq!(p.commit(hash, Check::Reread).unwrap(), Committed::Stored);
    assert_eq!(fs::read(&target).unwrap(), data);
}

#[test]
fn a_kept_partial_file_resumes_with_its_verified_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("big");
    let data: Vec<u8> = (0..20_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let m = Manifest::from_reader(&data[..], data.len() as u64).unwrap();
    let p = PartialFile::create(&target, "t", m.size()).unwrap();
    assert!(!p.resumed());
    for i in [0u32, 2, 3] {
        let off = m.chunk_offset(i) as usize;
        p.write_at(
            off as u64,
            &data[off..off + m.chunk_len(i).unwrap() as usize],
        )
        .unwrap();
    }
    p.keep_for_resume();
    drop(p);
    let p = PartialFile::create(&target, "t", m.size()).unwrap();
    assert!(p.resumed());
    let have = p.verified_chunks(&m).unwrap();
    let want: Vec<bool> = (0..m.chunk_count())
        .map(|i| [0, 2, 3].contains(&i))
        .collect();
    assert_eq!(have, want);
    drop(p);
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        0,
        "not kept this time"
    );
}

#[test]
fn uploads_follow_the_conflict_rules() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("have.txt"), b"same").unwrap();
    let store = Store::open(dir.path()).unwrap();
    let same = *blake3::hash(b"same").as_bytes();
    assert!(
        store
            .begin_upload(&name("have.txt"), 4, same, false)
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        store.begin_upload(&name("have.txt"), 4, [0; 32], false),
        Err(StoreError::Conflict(_))
    ));
    let first = store
        .begin_upload(&name("new.txt"), 4, same, false)
        .unwrap()
        .unwrap();
    assert!(matches!(
        store.begin_upload(&name("new.txt"), 4, same, false),
        Err(StoreError::Busy(_))
    ));
    drop(first);
    assert!(
        store
            .begin_upload(&name("new.txt"), 4, same, false)
            .unwrap()
            .is_some()
    );
}

#[test]
fn chunk_reads_must_be_one_chunk_of_the_layout() {
    let dir = tempfile::tempdir().unwrap();
    // 40 KiB: 16 chunks would be 2.5 KiB, so chunks are 2 KiB (a power of two).
    let data: Vec<u8> = (0..40 * 1024u32).map(|i| (i % 251) as u8).collect();
    fs::write(dir.path().join("f"), &data).unwrap();
    let store = Store::open(dir.path()).unwrap();
    let chunk = chunk_size_for(data.len() as u64);
    let c = chunk as u32;
    assert_eq!(
        store.read_chunk(&name("f"), chunk, c).unwrap(),
        &data[chunk as usize..2 * chunk as usize]
    );
    for (offset, len) in [(1, 10), (0, c + 1), (0, 64 << 20), (chunk / 2, c / 2)] {
        assert!(
            matches!(
                store.read_chunk(&name("f"), offset, len),
                Err(StoreError::NotAChunk { .. })
            ),
            "{offset}+{len}"
        );
    }
}

#[test]
fn a_symlink_planted_at_a_temp_name_is_replaced_and_its_target_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    fs::write(&victim, b"precious").unwrap();
    let target = dir.path().join("out.txt");
    symlink(&victim, dir.path().join(".out.txt.t.part")).unwrap();
    // A link to a missing path must not create that path either.
    let missing = outside.path().join("created");
    symlink(&missing, dir.path().join(".out.txt.u.part")).unwrap();
    let data = b"new bytes";
    for tag in ["t", "u"] {
        let p = PartialFile::create(&target, tag, data.len() as u64).unwrap();
        p.write_at(0, data).unwrap();
        if tag == "t" {
            let hash = *blake3::hash(data).as_bytes();
            assert_eq!(p.commit(hash, Check::Reread).unwrap(), Committed::Stored);
        }
    }
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    assert!(!missing.exists());
    assert!(fs::symlink_metadata(&target).unwrap().is_file());
    assert_eq!(fs::read(&target).unwrap(), data);
}

#[test]
fn a_fifo_in_place_of_a_served_file_is_not_found_and_never_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe.txt");
    let c = c_path(&fifo).unwrap();
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let store = Store::open(dir.path()).unwrap();
    // Without O_NONBLOCK this open would wait for a writer forever.
    assert!(not_found(store.open_regular(&name("pipe.txt"))));
    assert!(not_found(store.read_chunk(&name("pipe.txt"), 0, 1)));
}

#[test]
fn uploads_take_disk_as_bytes_arrive_and_stale_ones_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let size = 1 << 30;
    let up = store
        .begin_upload(&name("big.txt"), size, [0; 32], false)
        .unwrap()
        .unwrap();
    up.partial.write_at(0, b"x").unwrap();
    let temp = fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().contains("upload-"))
        .unwrap()
        .path();
    let blocks = fs::metadata(&temp).unwrap().blocks() * 512;
    assert!(
        blocks < 1 << 20,
        "{blocks} bytes allocated for 1 byte written"
    );
    // While the upload is alive its file is locked, so it is not stale.
    assert_eq!(store.remove_stale_uploads().unwrap().0, 0);
    // A dead server's upload (kept as if killed), and a download's .part, which stays.
    up.partial.keep_for_resume();
    drop(up);
    fs::write(
        dir.path().join(".dl.txt.0123456789abcdef.part"),
        b"resume me",
    )
    .unwrap();
    assert_eq!(store.remove_stale_uploads().unwrap().0, 1);
    assert!(!temp.exists());
    assert!(dir.path().join(".dl.txt.0123456789abcdef.part").exists());
}

/// A small file is read whole only as the version asked for, at its exact size, and never over
/// the limit of a whole read.
#[test]
fn a_whole_read_is_of_the_version_asked_at_its_size() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("n")).unwrap();
    fs::write(dir.path().join("n/a.txt"), b"hello, folder").unwrap();
    let big = vec![7u8; MAX_WHOLE_FILE as usize + 1];
    fs::write(dir.path().join("big"), &big).unwrap();
    let store = Store::open(dir.path()).unwrap();
    let b3 = *blake3::hash(b"hello, folder").as_bytes();
    let a = name("n/a.txt");
    assert_eq!(store.read_whole(&a, &b3, 13).unwrap(), b"hello, folder");
    assert!(not_found(store.read_whole(&a, &[0; 32], 13)));
    assert!(matches!(
        store.read_whole(&a, &b3, 12),
        Err(StoreError::NotAChunk { .. })
    ));
    let big_b3 = *blake3::hash(&big).as_bytes();
    let len = big.len() as u32;
    assert!(matches!(
        store.read_whole(&name("big"), &big_b3, len),
        Err(StoreError::NotAChunk { .. })
    ));
}

/// Staged files appear under their names only when their batch commits; a name taken meanwhile
/// by the same content is fine, by other content a conflict; nothing staged is left behind.
#[test]
fn a_batch_shows_its_files_only_when_it_commits_and_never_replaces_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let batch = Batch::default();
    let h = |b: &[u8]| *blake3::hash(b).as_bytes();
    assert!(!batch.stage(&d.join("a"), b"one", h(b"one")).unwrap());
    assert!(!batch.stage(&d.join("b"), b"two", h(b"two")).unwrap());
    assert!(!d.join("a").exists() && !d.join("b").exists());
    fs::write(d.join("b"), b"two").unwrap();
    let done = batch.commit().unwrap();
    assert_eq!(
        done,
        [
            (d.join("a"), Committed::Stored),
            (d.join("b"), Committed::AlreadyPresent)
        ]
    );
    assert_eq!(fs::read(d.join("a")).unwrap(), b"one");
    batch.stage(&d.join("c"), b"new", h(b"new")).unwrap();
    fs::write(d.join("c"), b"old").unwrap();
    assert!(matches!(batch.commit(), Err(StoreError::Conflict(_))));
    assert_eq!(fs::read(d.join("c")).unwrap(), b"old");
    batch.stage(&d.join("e"), b"never", h(b"never")).unwrap();
    drop(batch);
    let mut left: Vec<_> = fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["a", "b", "c"]);
}

/// A walk hashes what the index does not know unchanged: after a save, nothing is read again;
/// a file rewritten with the same size and mtime is still noticed (its ctime moved), as is one
/// written after being linked, and a damaged index only costs hashing.
#[test]
fn the_index_of_hashes_spares_reading_unchanged_files_only() {
    let root = tempfile::tempdir().unwrap();
    let folder = root.path().join("notes");
    fs::create_dir_all(folder.join("a")).unwrap();
    for i in 0..100 {
        fs::write(folder.join(format!("a/n{i}.txt")), format!("note {i:03}")).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(150));
    let first = walk_hashed(root.path(), &folder);
    assert_eq!((first.entries.len(), first.hashed()), (100, 100));
    first.save().unwrap();
    assert_eq!(walk_hashed(root.path(), &folder).hashed(), 0);

    // Same size, mtime put back: only the ctime tells.
    let edited = folder.join("a/n7.txt");
    let mtime = fs::metadata(&edited).unwrap().modified().unwrap();
    fs::write(&edited, "note 999").unwrap();
    File::options()
        .write(true)
        .open(&edited)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(150));
    let again = walk_hashed(root.path(), &folder);
    assert_eq!(again.hashed(), 1);
    let e = again.entries.iter().find(|e| e.path.as_str() == "a/n7.txt");
    assert_eq!(e.unwrap().blake3, *blake3::hash(b"note 999").as_bytes());

    // Files linked by a download are noted; one changed before the save is not recorded.
    let batch = Batch::noting(again.journal(), root.path());
    let (linked, kept) = (folder.join("a/new.txt"), folder.join("a/kept.txt"));
    for (f, data) in [(&linked, "first"), (&kept, "kept")] {
        let b3 = *blake3::hash(data.as_bytes()).as_bytes();
        batch.stage(f, data.as_bytes(), b3).unwrap();
    }
    batch.commit().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(150));
    fs::write(&linked, "other").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(150));
    again.save().unwrap();
    let after = walk_hashed(root.path(), &folder);
    assert_eq!(
        after.hashed(),
        1,
        "the changed file is read, the other 101 known"
    );
    let e = after
        .entries
        .iter()
        .find(|e| e.path.as_str() == "a/new.txt");
    assert_eq!(e.unwrap().blake3, *blake3::hash(b"other").as_bytes());
    assert!(
        !root
            .path()
            .join(format!("{HASHES_FILE}.{}.linked", std::process::id()))
            .exists()
    );

    // What a killed download staged goes; what a live one stages stays.
    let dead = folder.join("a/.n1.txt.4194303-7.staged");
    let live = folder.join(format!("a/.n1.txt.{}-8.staged", std::process::id()));
    let init = folder.join("a/.n2.txt.1-9.staged");
    for f in [&dead, &live, &init] {
        fs::write(f, "staged").unwrap();
    }
    walk_hashed(root.path(), &folder);
    assert!(!dead.exists() && live.exists() && init.exists());

    // Damaged: read as far as it goes, the rest hashed.
    fs::write(root.path().join(HASHES_FILE), b"qnhash01\xff\xff\xff").unwrap();
    let damaged = walk_hashed(root.path(), &folder);
    assert_eq!((damaged.entries.len(), damaged.hashed()), (102, 102));
    // A folder outside served_files has no index.
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("x"), "x").unwrap();
    let w = walk_hashed(root.path(), outside.path());
    assert!(w.journal().is_none());
    w.save().unwrap();
    assert!(!outside.path().join(HASHES_FILE).exists());
}
