//! What the live peers hold: name → versions (size, hash) → holders, and
//! hash → versions. A peer's entries are replaced whole when it offers a
//! new list and removed when it expires or unregisters, so the index only
//! ever names live peers.
//!
//! Each holding is stored twice, once on each side, with the position of
//! its twin, so that adding and removing one is O(1) however many peers
//! hold a popular file: 16 bytes a holding, plus the names and versions.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    ops::Bound,
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use globset::GlobMatcher;
use protocol::{
    identity::PeerKey,
    index::{Holder, Holding, ListDigest, Listed, MAX_REPLY_LINES},
    ContentHash, FileName, PeerAddr,
};

use super::{Page, Refused, MAX_VERSIONS, SCAN_BUDGET};

type PeerId = u32;
type VersionId = u32;

pub struct Index {
    inner: RwLock<Inner>,
    max_holdings: usize,
}

#[derive(Default)]
struct Inner {
    peer_ids: HashMap<PeerAddr, PeerId>,
    peers: Vec<Option<Peer>>,
    free_peers: Vec<PeerId>,
    versions: Vec<Option<Version>>,
    free_versions: Vec<VersionId>,
    /// Each name's most recent version; the others are chained from it
    /// (`Version::next_same_name`): most names have one version, and a
    /// `Vec` per name cost more than the chain.
    names: BTreeMap<Arc<str>, VersionId>,
    /// Versions by the first 8 bytes of their hash, chained likewise;
    /// the full hash is compared on the way.
    by_hash: HashMap<u64, VersionId>,
    holdings: usize,
}

struct Peer {
    addr: PeerAddr,
    key: PeerKey,
    digest: ListDigest,
    /// What it holds, each with its place in the version's holders.
    files: Vec<(VersionId, u32)>,
}

struct Version {
    name: Arc<str>,
    size: u64,
    hash: ContentHash,
    /// Who holds it, each with the place of this version in its files.
    holders: Vec<(PeerId, u32)>,
    /// The next version of the same name, `NONE` at the end.
    next_same_name: VersionId,
    /// The next version whose hash has the same first 8 bytes.
    next_same_hash: VersionId,
}

/// The end of a chain of versions.
const NONE: VersionId = VersionId::MAX;

/// The key of `by_hash`.
fn prefix(hash: &ContentHash) -> u64 {
    let mut first = [0; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

impl Index {
    pub fn new(max_holdings: usize) -> Self {
        Index {
            inner: RwLock::default(),
            max_holdings,
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The digest of the list held for `peer`, if any.
    pub fn digest(&self, peer: &PeerAddr) -> Option<ListDigest> {
        let inner = self.read();
        let id = *inner.peer_ids.get(peer)?;
        inner.peer(id).map(|p| p.digest)
    }

    /// Replaces what `peer` holds with `files` (checked, sorted and capped
    /// by the protocol already); returns how many it holds now.
    pub fn replace(
        &self,
        peer: PeerAddr,
        key: PeerKey,
        digest: ListDigest,
        files: &[Holding],
    ) -> Result<usize, Refused> {
        let mut inner = self.write();
        let old = inner
            .peer_ids
            .get(&peer)
            .and_then(|&id| inner.peer(id))
            .map_or(0, |p| p.files.len());
        if inner.holdings - old + files.len() > self.max_holdings {
            return Err(Refused::Full {
                max: self.max_holdings,
            });
        }
        inner.remove(&peer);
        let id = inner.add_peer(peer, key, digest, files.len());
        for file in files {
            inner.hold(id, file);
        }
        Ok(files.len())
    }

    /// Forgets what `peer` holds.
    pub fn remove(&self, peer: &PeerAddr) {
        self.write().remove(peer);
    }

    /// Holders of the versions of `name`, most held first: a random
    /// sample of at most `per_version` live holders of each.
    pub fn who(&self, name: &FileName, per_version: usize) -> Vec<Holder> {
        let inner = self.read();
        let versions = inner.name_chain(inner.names.get(name.as_str()).copied());
        inner.holders(versions, per_version)
    }

    /// Holders of the content `hash`, under whatever name.
    pub fn who_has(&self, hash: &ContentHash, per_version: usize) -> Vec<Holder> {
        let inner = self.read();
        let versions = inner
            .hash_chain(inner.by_hash.get(&prefix(hash)).copied())
            .into_iter()
            .filter(|&v| inner.version(v).is_some_and(|v| v.hash == *hash))
            .collect();
        inner.holders(versions, per_version)
    }

    /// The versions of the names matching `pattern`, in name order, from
    /// after `after`: at most `MAX_REPLY_LINES` lines, a name's versions
    /// never split over two pages.
    pub fn list(&self, pattern: &GlobMatcher, after: Option<&FileName>) -> Page {
        let inner = self.read();
        let start = match after {
            Some(after) => Bound::Excluded(after.as_str()),
            None => Bound::Unbounded,
        };
        let mut entries = Vec::new();
        let mut last: Option<&str> = None;
        for (scanned, (name, &first)) in inner
            .names
            .range::<str, _>((start, Bound::Unbounded))
            .enumerate()
        {
            let versions = inner.name_chain(Some(first));
            if scanned == SCAN_BUDGET
                || (entries.len() + versions.len().min(MAX_VERSIONS) > MAX_REPLY_LINES)
            {
                return Page {
                    entries,
                    next: last.and_then(|n| FileName::new(n).ok()),
                };
            }
            last = Some(name);
            if !pattern.is_match(&**name) {
                continue;
            }
            let Ok(file_name) = FileName::new(name) else {
                continue;
            };
            let mut listed: Vec<&Version> =
                versions.iter().filter_map(|&v| inner.version(v)).collect();
            listed.sort_by_key(|v| std::cmp::Reverse(v.holders.len()));
            entries.extend(listed.into_iter().take(MAX_VERSIONS).map(|v| Listed {
                name: file_name.clone(),
                size: v.size,
                hash: v.hash,
                holders: v.holders.len() as u64,
            }));
        }
        Page {
            entries,
            next: None,
        }
    }

    /// Holdings in the index, and distinct names.
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.read();
        (inner.holdings, inner.names.len())
    }
}

impl Inner {
    fn peer(&self, id: PeerId) -> Option<&Peer> {
        self.peers.get(id as usize)?.as_ref()
    }

    fn version(&self, id: VersionId) -> Option<&Version> {
        self.versions.get(id as usize)?.as_ref()
    }

    fn add_peer(
        &mut self,
        addr: PeerAddr,
        key: PeerKey,
        digest: ListDigest,
        files: usize,
    ) -> PeerId {
        let peer = Peer {
            addr,
            key,
            digest,
            files: Vec::with_capacity(files),
        };
        let id = put(&mut self.peers, &mut self.free_peers, peer);
        self.peer_ids.insert(addr, id);
        id
    }

    /// Records that peer `id` holds `file`.
    fn hold(&mut self, id: PeerId, file: &Holding) {
        let version = self.version_of(file);
        let (Some(Some(peer)), Some(Some(v))) = (
            self.peers.get_mut(id as usize),
            self.versions.get_mut(version as usize),
        ) else {
            return;
        };
        let (in_peer, in_version) = (peer.files.len() as u32, v.holders.len() as u32);
        peer.files.push((version, in_version));
        v.holders.push((id, in_peer));
        self.holdings += 1;
    }

    /// The versions chained from `first` by name.
    fn name_chain(&self, first: Option<VersionId>) -> Vec<VersionId> {
        self.chain(first, |v| v.next_same_name)
    }

    /// The versions chained from `first` by hash prefix.
    fn hash_chain(&self, first: Option<VersionId>) -> Vec<VersionId> {
        self.chain(first, |v| v.next_same_hash)
    }

    fn chain(&self, first: Option<VersionId>, next: fn(&Version) -> VersionId) -> Vec<VersionId> {
        let mut out = Vec::new();
        let mut at = first.unwrap_or(NONE);
        // Bounded by the number of versions, even if a chain were broken.
        while at != NONE && out.len() < self.versions.len() {
            let Some(v) = self.version(at) else { break };
            out.push(at);
            at = next(v);
        }
        out
    }

    /// The version `file` is of, made if new.
    fn version_of(&mut self, file: &Holding) -> VersionId {
        let first = self.names.get(file.name.as_str()).copied();
        for v in self.name_chain(first) {
            if let Some(version) = self.version(v) {
                if (version.size, version.hash) == (file.size, file.hash) {
                    return v;
                }
            }
        }
        let name: Arc<str> = match self.names.get_key_value(file.name.as_str()) {
            Some((name, _)) => Arc::clone(name),
            None => Arc::from(file.name.as_str()),
        };
        let version = Version {
            name: Arc::clone(&name),
            size: file.size,
            hash: file.hash,
            holders: Vec::new(),
            next_same_name: first.unwrap_or(NONE),
            next_same_hash: self
                .by_hash
                .get(&prefix(&file.hash))
                .copied()
                .unwrap_or(NONE),
        };
        let id = put(&mut self.versions, &mut self.free_versions, version);
        self.names.insert(name, id);
        self.by_hash.insert(prefix(&file.hash), id);
        id
    }

    fn remove(&mut self, addr: &PeerAddr) {
        let Some(id) = self.peer_ids.remove(addr) else {
            return;
        };
        let Some(peer) = self.peers.get_mut(id as usize).and_then(Option::take) else {
            return;
        };
        self.free_peers.push(id);
        for (version, at) in peer.files {
            self.holdings -= 1;
            let Some(Some(v)) = self.versions.get_mut(version as usize) else {
                continue;
            };
            v.holders.swap_remove(at as usize);
            // The holder moved into the gap must learn its new place.
            if let Some(&(moved, in_moved)) = v.holders.get(at as usize) {
                if let Some(Some(other)) = self.peers.get_mut(moved as usize) {
                    other.files[in_moved as usize].1 = at;
                }
            }
            if v.holders.is_empty() {
                self.drop_version(version);
            }
        }
    }

    fn drop_version(&mut self, id: VersionId) {
        let Some(v) = self.versions.get_mut(id as usize).and_then(Option::take) else {
            return;
        };
        self.free_versions.push(id);
        if let Some(head) = self.names.get(&*v.name).copied() {
            match self.unlink(id, head, v.next_same_name, |x| &mut x.next_same_name) {
                Some(head) => {
                    self.names.insert(Arc::clone(&v.name), head);
                }
                None => {
                    self.names.remove(&*v.name);
                }
            }
        }
        let key = prefix(&v.hash);
        if let Some(head) = self.by_hash.get(&key).copied() {
            match self.unlink(id, head, v.next_same_hash, |x| &mut x.next_same_hash) {
                Some(head) => self.by_hash.insert(key, head),
                None => self.by_hash.remove(&key),
            };
        }
    }

    /// Takes `id` (whose successor was `after`) out of the chain that
    /// starts at `head` and runs through `link`; returns the chain's head
    /// now, `None` when it is empty.
    fn unlink(
        &mut self,
        id: VersionId,
        head: VersionId,
        after: VersionId,
        link: fn(&mut Version) -> &mut VersionId,
    ) -> Option<VersionId> {
        if head == id {
            return (after != NONE).then_some(after);
        }
        let mut at = head;
        // Bounded by the number of versions, even if a chain were broken.
        for _ in 0..self.versions.len() {
            let Some(Some(v)) = self.versions.get_mut(at as usize) else {
                break;
            };
            let next = link(v);
            if *next == id {
                *next = after;
                break;
            }
            at = *next;
        }
        Some(head)
    }

    /// Samples of the holders of `versions`, most held first.
    fn holders(&self, versions: Vec<VersionId>, per_version: usize) -> Vec<Holder> {
        let mut versions: Vec<&Version> =
            versions.iter().filter_map(|&v| self.version(v)).collect();
        versions.sort_by_key(|v| std::cmp::Reverse(v.holders.len()));
        let mut out = Vec::new();
        for v in versions.into_iter().take(MAX_VERSIONS) {
            let Ok(name) = FileName::new(&v.name) else {
                continue;
            };
            let room = MAX_REPLY_LINES.saturating_sub(out.len());
            for &(peer, _) in sample(&v.holders, per_version.min(room)) {
                if let Some(p) = self.peer(peer) {
                    out.push(Holder {
                        addr: p.addr,
                        key: p.key,
                        name: name.clone(),
                        size: v.size,
                        hash: v.hash,
                        holders: v.holders.len() as u64,
                    });
                }
            }
        }
        out
    }
}

/// Puts `item` in a free slot of `slots` (or a new one); returns its number.
fn put<T>(slots: &mut Vec<Option<T>>, free: &mut Vec<u32>, item: T) -> u32 {
    match free.pop() {
        Some(id) => {
            slots[id as usize] = Some(item);
            id
        }
        None => {
            slots.push(Some(item));
            (slots.len() - 1) as u32
        }
    }
}

/// At most `k` distinct items of `items`, picked at random.
fn sample<T>(items: &[T], k: usize) -> Vec<&T> {
    if items.len() <= k {
        let mut all: Vec<&T> = items.iter().collect();
        fastrand::shuffle(&mut all);
        return all;
    }
    let mut picked = HashSet::with_capacity(k);
    while picked.len() < k {
        picked.insert(fastrand::usize(..items.len()));
    }
    picked.into_iter().map(|i| &items[i]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::ports;

    fn addr(port: u16) -> PeerAddr {
        PeerAddr::new([127, 0, 0, 1].into(), port).unwrap()
    }

    fn holding(name: &str, content: &str) -> Holding {
        Holding {
            name: FileName::new(name).unwrap(),
            size: content.len() as u64,
            hash: blake3::hash(content.as_bytes()),
        }
    }

    fn offer(index: &Index, port: u16, files: &[Holding]) -> Result<usize, Refused> {
        let key = protocol::identity::Identity::from_seed([port as u8; 32]).key();
        index.replace(addr(port), key, ListDigest::of(files), files)
    }

    fn all() -> GlobMatcher {
        globset::Glob::new("**").unwrap().compile_matcher()
    }

    fn name(s: &str) -> FileName {
        FileName::new(s).unwrap()
    }

    #[test]
    fn holders_follow_offers_and_removals() {
        let index = Index::new(1000);
        offer(&index, 1, &[holding("a", "x"), holding("b", "y")]).unwrap();
        offer(&index, 2, &[holding("a", "x")]).unwrap();
        offer(&index, 3, &[holding("a", "x")]).unwrap();
        assert_eq!(ports(&index.who(&name("a"), 50)), [1, 2, 3]);
        assert!(index.who(&name("a"), 50).iter().all(|h| h.holders == 3));
        // Removal in the middle keeps the others' positions right.
        index.remove(&addr(2));
        assert_eq!(ports(&index.who(&name("a"), 50)), [1, 3]);
        index.remove(&addr(1));
        index.remove(&addr(3));
        assert!(index.who(&name("a"), 50).is_empty());
        assert_eq!(index.counts(), (0, 0));
    }

    #[test]
    fn a_new_list_replaces_the_old_one() {
        let index = Index::new(1000);
        offer(&index, 1, &[holding("a", "x"), holding("b", "y")]).unwrap();
        let files = [holding("b", "y"), holding("c", "z")];
        offer(&index, 1, &files).unwrap();
        assert!(index.who(&name("a"), 50).is_empty());
        assert_eq!(index.who(&name("c"), 50).len(), 1);
        assert_eq!(index.digest(&addr(1)), Some(ListDigest::of(&files)));
        assert_eq!(index.counts(), (2, 2));
    }

    #[test]
    fn versions_come_most_held_first_and_content_is_found_under_any_name() {
        let index = Index::new(1000);
        offer(&index, 1, &[holding("a", "old")]).unwrap();
        offer(&index, 2, &[holding("a", "new"), holding("copy", "old")]).unwrap();
        offer(&index, 3, &[holding("a", "new")]).unwrap();
        let holders = index.who(&name("a"), 50);
        assert_eq!(holders.len(), 3);
        assert_eq!(holders[0].hash, blake3::hash(b"new"));
        assert_eq!(holders[0].holders, 2);
        assert_eq!(holders[2].hash, blake3::hash(b"old"));
        let by_hash = index.who_has(&blake3::hash(b"old"), 50);
        let mut names: Vec<&str> = by_hash.iter().map(|h| h.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["a", "copy"]);
    }

    #[test]
    fn versions_leave_their_chains_from_any_place() {
        let index = Index::new(1000);
        // Three versions of one name, held by one peer each.
        for (port, content) in [(1, "v1"), (2, "v2"), (3, "v3")] {
            offer(&index, port, &[holding("a", content)]).unwrap();
        }
        let hashes = |index: &Index| {
            let mut found: Vec<ContentHash> =
                index.who(&name("a"), 50).iter().map(|h| h.hash).collect();
            found.sort_by_key(|h| *h.as_bytes());
            found
        };
        let mut all = vec![
            blake3::hash(b"v1"),
            blake3::hash(b"v2"),
            blake3::hash(b"v3"),
        ];
        all.sort_by_key(|h| *h.as_bytes());
        assert_eq!(hashes(&index), all);
        // The middle of the chain, then its head, then the last one.
        for (port, gone) in [(2, "v2"), (3, "v3"), (1, "v1")] {
            index.remove(&addr(port));
            all.retain(|h| *h != blake3::hash(gone.as_bytes()));
            assert_eq!(hashes(&index), all);
            assert!(index.who_has(&blake3::hash(gone.as_bytes()), 50).is_empty());
        }
        assert_eq!(index.counts(), (0, 0));
        // Slots are reused cleanly.
        offer(&index, 4, &[holding("a", "v4")]).unwrap();
        assert_eq!(index.who_has(&blake3::hash(b"v4"), 50).len(), 1);
    }

    #[test]
    fn samples_are_capped_and_random() {
        let index = Index::new(100_000);
        for port in 1..=300 {
            offer(&index, port, &[holding("popular", "p")]).unwrap();
        }
        let first = index.who(&name("popular"), 50);
        assert_eq!(first.len(), 50);
        assert!(first.iter().all(|h| h.holders == 300));
        let distinct: HashSet<u16> = (0..10)
            .flat_map(|_| index.who(&name("popular"), 50))
            .map(|h| h.addr.port())
            .collect();
        assert!(distinct.len() > 100, "{}", distinct.len());
    }

    #[test]
    fn the_holdings_cap_refuses_and_keeps_the_old_list() {
        let index = Index::new(3);
        offer(&index, 1, &[holding("a", "x"), holding("b", "y")]).unwrap();
        assert_eq!(
            offer(&index, 2, &[holding("c", "1"), holding("d", "2")]),
            Err(Refused::Full { max: 3 })
        );
        // Replacing one's own list counts only the difference.
        offer(
            &index,
            1,
            &[holding("a", "x"), holding("b", "y"), holding("e", "z")],
        )
        .unwrap();
        assert_eq!(index.counts().0, 3);
    }

    #[test]
    fn pages_cover_every_match_once_in_order() {
        let index = Index::new(100_000);
        let files: Vec<Holding> = (0..2500)
            .map(|i| holding(&format!("dir{}/f{i:04}.txt", i % 2), "c"))
            .collect();
        let mut sorted = files.clone();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        offer(&index, 1, &sorted).unwrap();
        let pattern = globset::GlobBuilder::new("dir1/*.txt")
            .literal_separator(true)
            .build()
            .unwrap()
            .compile_matcher();
        let (mut seen, mut after, mut pages) = (Vec::new(), None, 0);
        loop {
            let page = index.list(&pattern, after.as_ref());
            pages += 1;
            seen.extend(page.entries.into_iter().map(|e| e.name.to_string()));
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
            assert!(pages < 10);
        }
        let expected: Vec<String> = sorted
            .iter()
            .map(|f| f.name.to_string())
            .filter(|n| n.starts_with("dir1/"))
            .collect();
        assert_eq!(seen, expected);
        assert!(pages >= 2, "1250 matches take two pages");
        let everything = index.list(&all(), None);
        assert_eq!(everything.entries.len(), MAX_REPLY_LINES);
    }
}
