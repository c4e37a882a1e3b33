//! Verified streaming: the BLAKE3 tree of a file cut into chunk groups of
//! 16 KiB, the proof that goes before the bytes of a `RANGE` reply, and its
//! check, group by group.
//!
//! The tree is BLAKE3's own (its root is the file's BLAKE3 hash), kept
//! down to chunk groups of 16 chunks of 1024 bytes: what bao-tree calls
//! block size 4, as iroh uses. A proof for a range is the 64-byte parent
//! nodes (left child's chaining value, then right child's) that a pre-order
//! walk from the root down to every group of the range meets, in the order
//! it meets them; parents below a group are not sent (the group is hashed
//! whole). PROTOCOL.md says the same for readers without this code.
//!
//! Pure computation: no I/O beyond the `Read` given to [`outboard`].

use std::io::{self, Read};

use bao_tree::{
    io::{outboard::PostOrderMemOutboard, sync::Outboard as _},
    iter::BaoChunk,
    BaoTree, BlockSize, ChunkNum, ChunkRanges,
};

use crate::ContentHash;

/// log2 of the chunks in a group: 16 chunks of 1024 bytes.
const GROUP_LOG: u8 = 4;
const CHUNK: u64 = 1024;
/// The bytes of one chunk group, the unit of verification. Ranges start
/// at a multiple of it.
pub const GROUP: u64 = CHUNK << GROUP_LOG;
const BLOCK_SIZE: BlockSize = BlockSize::from_chunk_log(GROUP_LOG);
/// One parent node on the wire: two chaining values.
pub const PARENT: u64 = 64;

/// The parent nodes of a file's tree (0.4% of its size), kept beside its
/// hash so that proofs need no second read of the file.
#[derive(Clone, Debug)]
pub struct Outboard(PostOrderMemOutboard);

impl Outboard {
    /// The BLAKE3 hash of the content: the tree's root.
    pub fn hash(&self) -> ContentHash {
        self.0.root
    }

    /// The length of the content it was made from.
    pub fn size(&self) -> u64 {
        self.0.tree.size()
    }

    /// Bytes held, for a cache to count.
    pub fn bytes(&self) -> usize {
        self.0.data.len()
    }
}

/// Reads exactly `size` bytes from `data` and makes their outboard, whose
/// root is their BLAKE3 hash.
pub fn outboard(data: impl Read, size: u64) -> io::Result<Outboard> {
    let tree = BaoTree::new(size, BLOCK_SIZE);
    let mut nodes = Vec::with_capacity(usize::try_from(tree.outboard_size()).unwrap_or(0));
    let root = bao_tree::io::sync::outboard_post_order(data, tree, &mut nodes)?;
    Ok(Outboard(PostOrderMemOutboard {
        root,
        tree,
        data: nodes,
    }))
}

/// Why a range cannot be asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("start {start} is not a multiple of {GROUP}")]
    Unaligned { start: u64 },
    #[error("end {end} is neither a multiple of {GROUP} nor the size {size}")]
    BadEnd { end: u64, size: u64 },
    #[error("range {start}-{end} is empty or past the end ({size} bytes)")]
    Outside { start: u64, end: u64, size: u64 },
}

/// Checks a range of a file of `size` bytes: `start` a multiple of
/// [`GROUP`], `end` one too or the size, `start < end <= size`; the one
/// range of an empty file is `0..0`.
pub fn check_range(size: u64, start: u64, end: u64) -> Result<(), RangeError> {
    if size == 0 && start == 0 && end == 0 {
        return Ok(());
    }
    if start >= end || end > size {
        return Err(RangeError::Outside { start, end, size });
    }
    if !start.is_multiple_of(GROUP) {
        return Err(RangeError::Unaligned { start });
    }
    if !end.is_multiple_of(GROUP) && end != size {
        return Err(RangeError::BadEnd { end, size });
    }
    Ok(())
}

/// The walk of the tree for a checked range: parents and groups in the
/// order they are sent and checked.
fn walk(size: u64, start: u64, end: u64) -> impl Iterator<Item = BaoChunk> {
    let tree = BaoTree::new(size, BLOCK_SIZE);
    let first = ChunkNum(start / CHUNK);
    let ranges = if end >= size {
        ChunkRanges::from(first..)
    } else {
        ChunkRanges::from(first..ChunkNum(end / CHUNK))
    };
    bao_tree::iter::ResponseIter::new(tree, ranges)
}

/// The length of the proof of a checked range, in bytes.
pub fn proof_len(size: u64, start: u64, end: u64) -> u64 {
    let parents = walk(size, start, end)
        .filter(|item| matches!(item, BaoChunk::Parent { .. }))
        .count() as u64;
    parents * PARENT
}

/// Appends the proof of a checked range of the outboard's content to `out`.
pub fn encode_proof(
    outboard: &Outboard,
    start: u64,
    end: u64,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    for item in walk(outboard.size(), start, end) {
        if let BaoChunk::Parent { node, .. } = item {
            let (left, right) = outboard
                .0
                .load(node)?
                .ok_or_else(|| io::Error::other("outboard lacks a parent node"))?;
            out.extend_from_slice(left.as_bytes());
            out.extend_from_slice(right.as_bytes());
        }
    }
    Ok(())
}

/// Why a proof or a group does not check out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("proof of {got} bytes where {want} were due")]
    Length { got: u64, want: u64 },
    #[error("proof does not lead to the hash (parent {index} is wrong)")]
    Parent { index: u64 },
}

/// One chunk group of a range, with the chaining value it must hash to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group {
    /// Where it starts in the file.
    pub offset: u64,
    /// Its length: [`GROUP`], less for the last group of the file.
    pub len: usize,
    /// The group is the whole file: its hash is the file's hash.
    is_root: bool,
    hash: ContentHash,
}

impl Group {
    /// Whether `data` is this group's content.
    pub fn verify(&self, data: &[u8]) -> bool {
        use blake3::hazmat::HasherExt;
        if data.len() != self.len {
            return false;
        }
        if self.is_root {
            return blake3::hash(data) == self.hash;
        }
        let mut hasher = blake3::Hasher::new();
        hasher.set_input_offset(self.offset);
        hasher.update(data);
        ContentHash::from(hasher.finalize_non_root()) == self.hash
    }
}

/// Checks the proof of a checked range against the file's hash, before any
/// of its bytes arrive; returns the groups of the range, in order, each
/// with the chaining value that its bytes must hash to.
pub fn verify_proof(
    size: u64,
    hash: &ContentHash,
    start: u64,
    end: u64,
    proof: &[u8],
) -> Result<Vec<Group>, ProofError> {
    use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, Mode};
    let want = proof_len(size, start, end);
    if proof.len() as u64 != want {
        return Err(ProofError::Length {
            got: proof.len() as u64,
            want,
        });
    }
    // Chaining values still to be matched, the next one on top.
    let mut expected = vec![*hash];
    let mut parents = proof.chunks_exact(PARENT as usize);
    let mut groups = Vec::new();
    let mut index = 0;
    for item in walk(size, start, end) {
        let Some(due) = expected.pop() else {
            // The walk pushes a value for every node it visits: never.
            return Err(ProofError::Parent { index });
        };
        match item {
            BaoChunk::Parent {
                is_root,
                left,
                right,
                ..
            } => {
                let pair = parents.next().ok_or(ProofError::Parent { index })?;
                let mut l = [0; 32];
                let mut r = [0; 32];
                l.copy_from_slice(&pair[..32]);
                r.copy_from_slice(&pair[32..]);
                let merged = if is_root {
                    merge_subtrees_root(&l, &r, Mode::Hash)
                } else {
                    ContentHash::from(merge_subtrees_non_root(&l, &r, Mode::Hash))
                };
                if merged != due {
                    return Err(ProofError::Parent { index });
                }
                if right {
                    expected.push(ContentHash::from(r));
                }
                if left {
                    expected.push(ContentHash::from(l));
                }
                index += 1;
            }
            BaoChunk::Leaf {
                start_chunk,
                size: len,
                is_root,
                ..
            } => groups.push(Group {
                offset: start_chunk.0 * CHUNK,
                len,
                is_root,
                hash: due,
            }),
        }
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn ranges(size: u64) -> Vec<(u64, u64)> {
        let mut out = vec![(0, size)];
        if size > GROUP {
            out.push((GROUP, size));
            out.push((0, GROUP));
        }
        if size > 3 * GROUP {
            out.push((GROUP, 3 * GROUP));
        }
        out
    }

    /// Sends and checks a range the way a peer and a client do.
    fn serve(data: &[u8], start: u64, end: u64) -> Result<Vec<u8>, String> {
        let ob = outboard(data, data.len() as u64).unwrap();
        let mut proof = Vec::new();
        encode_proof(&ob, start, end, &mut proof).unwrap();
        let groups = verify_proof(data.len() as u64, &ob.hash(), start, end, &proof)
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for g in groups {
            let bytes = &data[g.offset as usize..g.offset as usize + g.len];
            if !g.verify(bytes) {
                return Err(format!("group at {}", g.offset));
            }
            out.extend_from_slice(bytes);
        }
        Ok(out)
    }

    #[test]
    fn the_root_is_the_blake3_hash_and_the_outboard_is_small() {
        for len in [0, 1, 1024, 16384, 16385, 100_000, 1 << 20] {
            let data = content(len);
            let ob = outboard(&data[..], len as u64).unwrap();
            assert_eq!(ob.hash(), blake3::hash(&data), "{len}");
            // One parent per group but one: 64 bytes per 16 KiB, 0.4%.
            let groups = (len as u64).div_ceil(GROUP).max(1);
            assert_eq!(ob.bytes() as u64, (groups - 1) * PARENT, "{len}");
        }
    }

    #[test]
    fn every_range_checks_out_and_gives_its_bytes() {
        for len in [0, 1, 16384, 16385, 100_000, 300_000] {
            let data = content(len);
            for (start, end) in ranges(len as u64) {
                check_range(len as u64, start, end).unwrap();
                let got = serve(&data, start, end).unwrap();
                assert!(
                    got == data[start as usize..end as usize],
                    "{len} {start}-{end}"
                );
            }
        }
    }

    #[test]
    fn a_flipped_byte_fails_its_group_only() {
        let data = content(100_000);
        let ob = outboard(&data[..], 100_000).unwrap();
        let mut proof = Vec::new();
        encode_proof(&ob, 0, 100_000, &mut proof).unwrap();
        let groups = verify_proof(100_000, &ob.hash(), 0, 100_000, &proof).unwrap();
        let mut bad = data.clone();
        bad[40_000] ^= 1;
        let failing: Vec<u64> = groups
            .iter()
            .filter(|g| !g.verify(&bad[g.offset as usize..g.offset as usize + g.len]))
            .map(|g| g.offset)
            .collect();
        assert_eq!(failing, [32768]);
    }

    #[test]
    fn a_forged_or_cut_proof_is_refused() {
        let data = content(300_000);
        let ob = outboard(&data[..], 300_000).unwrap();
        let mut proof = Vec::new();
        encode_proof(&ob, GROUP, 300_000, &mut proof).unwrap();
        for at in 0..proof.len() {
            let mut forged = proof.clone();
            forged[at] ^= 0x40;
            assert!(
                verify_proof(300_000, &ob.hash(), GROUP, 300_000, &forged).is_err(),
                "byte {at}"
            );
        }
        let cut = &proof[..proof.len() - 1];
        assert!(matches!(
            verify_proof(300_000, &ob.hash(), GROUP, 300_000, cut),
            Err(ProofError::Length { .. })
        ));
        // The right proof for other content.
        assert!(verify_proof(300_000, &blake3::hash(b"x"), GROUP, 300_000, &proof).is_err());
    }

    #[test]
    fn ranges_are_checked() {
        assert!(check_range(100, 0, 100).is_ok());
        assert!(check_range(0, 0, 0).is_ok());
        assert!(check_range(100, 0, 0).is_err());
        assert!(check_range(100, 0, 101).is_err());
        assert!(check_range(100_000, 1, GROUP).is_err());
        assert!(check_range(100_000, 0, GROUP + 1).is_err());
        assert!(check_range(100_000, GROUP, GROUP).is_err());
        assert!(check_range(100_000, 2 * GROUP, GROUP).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_proofs_never_panic(
            size in 0u64..200_000,
            proof in proptest::collection::vec(any::<u8>(), 0..1024),
            a in any::<u64>(),
            b in any::<u64>(),
        ) {
            let start = a % (size / GROUP + 1) * GROUP;
            let end = if b % 2 == 0 { size } else { (start + GROUP).min(size) };
            if check_range(size, start, end).is_ok() {
                let _ = verify_proof(size, &blake3::hash(b"x"), start, end, &proof);
            }
        }

        #[test]
        fn any_range_round_trips(len in 0usize..120_000, a in any::<u64>(), b in any::<u64>()) {
            let data = content(len);
            let size = len as u64;
            let groups = size.div_ceil(GROUP);
            let start = if groups == 0 { 0 } else { a % groups * GROUP };
            let end = if groups == 0 { 0 } else { (start + (b % groups + 1) * GROUP).min(size) };
            check_range(size, start, end).unwrap();
            let got = serve(&data, start, end).unwrap();
            prop_assert!(got == data[start as usize..end as usize]);
        }
    }
}
