//! Selection of the best few candidates under the routing order: larger key first, then lower
//! index.

/// The `k` best `(key, index)` candidates offered so far, kept sorted best first.
///
/// Candidates arrive through [`TopK::offer_all`] in increasing index order, so a candidate whose
/// key equals a kept one's always comes after it: "better" is simply "larger key", and a
/// candidate enters only if its key is strictly larger than the worst kept key. Keys must not be
/// NaN (routing checks finiteness before selecting). The buffer is reused across rows: after the
/// first row it never allocates.
#[derive(Debug, Default)]
pub(crate) struct TopK {
    k: usize,
    entries: Vec<(f32, u32)>,
    /// The smallest index the next candidate may have.
    next_index: u32,
}

impl TopK {
    /// Empties the selection and sets how many candidates it keeps.
    pub(crate) fn reset(&mut self, k: usize) {
        self.k = k;
        self.entries.clear();
        self.entries.reserve(k);
        self.next_index = 0;
    }

    /// Inserts a candidate that beats the worst kept one (or fills a free slot), shifting worse
    /// entries down by one.
    fn insert(&mut self, key: f32, index: u32) {
        if self.entries.len() < self.k {
            self.entries.push((key, index));
        }
        let entries = &mut self.entries;
        let mut slot = entries.len() - 1;
        while slot > 0 && key > entries[slot - 1].0 {
            entries[slot] = entries[slot - 1];
            slot -= 1;
        }
        entries[slot] = (key, index);
    }

    /// Offers `keys[i]` with index `first_index + i` for every `i`. Successive calls (since the
    /// last [`reset`](Self::reset)) must offer increasing indices.
    ///
    /// Once `k` candidates are kept, chunks of keys are screened against the worst kept key with
    /// a branch-free comparison (vectorised), and only chunks holding a contender are looked at
    /// one by one.
    pub(crate) fn offer_all(&mut self, keys: &[f32], first_index: u32) {
        const CHUNK: usize = 16;
        debug_assert!(first_index >= self.next_index, "candidates must come in index order");
        self.next_index = first_index + keys.len() as u32;
        let free = (self.k - self.entries.len()).min(keys.len());
        let (filling, keys) = keys.split_at(free);
        for (offset, &key) in filling.iter().enumerate() {
            self.insert(key, first_index + offset as u32);
        }
        let mut index = first_index + free as u32;
        for chunk in keys.chunks(CHUNK) {
            let worst = |entries: &[(f32, u32)]| entries.last().map_or(f32::INFINITY, |e| e.0);
            let threshold = worst(&self.entries);
            if chunk.iter().fold(false, |any, &key| any | (key > threshold)) {
                for (offset, &key) in chunk.iter().enumerate() {
                    if key > worst(&self.entries) {
                        self.insert(key, index + offset as u32);
                    }
                }
            }
            index += chunk.len() as u32;
        }
    }

    /// The kept candidates, best first.
    pub(crate) fn sorted(&self) -> &[(f32, u32)] {
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(keys: &[f32], k: usize) -> Vec<u32> {
        let mut top = TopK::default();
        top.reset(k);
        top.offer_all(keys, 0);
        let all_at_once: Vec<u32> = top.sorted().iter().map(|&(_, i)| i).collect();
        // The same candidates offered in pieces select the same.
        top.reset(k);
        for (i, piece) in keys.chunks(3).enumerate() {
            top.offer_all(piece, 3 * i as u32);
        }
        let in_pieces: Vec<u32> = top.sorted().iter().map(|&(_, i)| i).collect();
        assert_eq!(all_at_once, in_pieces);
        // A plain sort with the routing order agrees.
        let mut order: Vec<u32> = (0..keys.len() as u32).collect();
        order.sort_by(|&a, &b| keys[b as usize].total_cmp(&keys[a as usize]).then(a.cmp(&b)));
        order.truncate(k);
        assert_eq!(all_at_once, order);
        all_at_once
    }

    #[test]
    fn keeps_the_largest_keys_best_first() {
        assert_eq!(select(&[0.1, 0.9, 0.5, 0.7, 0.3], 3), vec![1, 3, 2]);
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        // The probe from the spec: [.5,.7,.7,.1,.7,.2,.7,.7], k = 3.
        assert_eq!(select(&[0.5, 0.7, 0.7, 0.1, 0.7, 0.2, 0.7, 0.7], 3), vec![1, 2, 4]);
    }

    #[test]
    fn fewer_candidates_than_k_keeps_them_all() {
        assert_eq!(select(&[1.0, 2.0], 5), vec![1, 0]);
        assert!(select(&[], 3).is_empty());
    }

    #[test]
    fn screening_by_chunks_keeps_late_contenders() {
        // 100 keys, the best ones (including a tie with the kept worst) far into later chunks.
        let mut keys: Vec<f32> = (0..100).map(|i| (i % 7) as f32).collect();
        keys[90] = 50.0;
        keys[45] = 6.0;
        keys[99] = 50.0;
        assert_eq!(select(&keys, 3), vec![90, 99, 6]);
        let mut top = TopK::default();
        top.reset(2);
        top.offer_all(&[1.0, 2.0], 10);
        top.offer_all(&[2.0, 3.0], 20);
        let kept: Vec<u32> = top.sorted().iter().map(|&(_, i)| i).collect();
        assert_eq!(kept, vec![21, 11]);
    }

    #[test]
    fn negative_and_infinite_keys_are_ordered() {
        assert_eq!(select(&[f32::NEG_INFINITY, -2.0, f32::INFINITY, -0.5], 4), vec![2, 3, 1, 0]);
    }
}
