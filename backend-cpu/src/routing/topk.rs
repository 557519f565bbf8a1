//! Selection of the best few candidates under the routing order: larger key first, then lower
//! index.

/// The `k` best `(key, index)` candidates offered so far, kept sorted best first.
///
/// Keys must not be NaN (routing checks finiteness before selecting). The buffer is reused across
/// rows: after the first row it never allocates.
#[derive(Debug, Default)]
pub(crate) struct TopK {
    k: usize,
    entries: Vec<(f32, u32)>,
}

/// Whether `a` comes before `b`: larger key, or equal key and lower index.
fn precedes(a: (f32, u32), b: (f32, u32)) -> bool {
    a.0 > b.0 || (a.0 == b.0 && a.1 < b.1)
}

impl TopK {
    /// Empties the selection and sets how many candidates it keeps.
    pub(crate) fn reset(&mut self, k: usize) {
        self.k = k;
        self.entries.clear();
        // One spare slot: `offer` inserts before it truncates.
        self.entries.reserve(k + 1);
    }

    /// Offers a candidate; it is kept if it is among the `k` best so far.
    pub(crate) fn offer(&mut self, key: f32, index: u32) {
        let candidate = (key, index);
        if self.entries.len() == self.k {
            match self.entries.last() {
                Some(&worst) if precedes(candidate, worst) => {}
                _ => return,
            }
        }
        let position = self.entries.iter().position(|&kept| precedes(candidate, kept));
        self.entries.insert(position.unwrap_or(self.entries.len()), candidate);
        self.entries.truncate(self.k);
    }

    /// The kept candidates, best first.
    pub(crate) fn entries(&self) -> &[(f32, u32)] {
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(keys: &[f32], k: usize) -> Vec<u32> {
        let mut top = TopK::default();
        top.reset(k);
        for (i, &key) in keys.iter().enumerate() {
            top.offer(key, i as u32);
        }
        top.entries().iter().map(|&(_, i)| i).collect()
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
    fn order_of_offers_does_not_matter() {
        let keys = [0.2f32, 0.8, 0.8, -1.0, 0.8, 3.0];
        let mut top = TopK::default();
        top.reset(4);
        for i in (0..keys.len()).rev() {
            top.offer(keys[i], i as u32);
        }
        let reversed: Vec<u32> = top.entries().iter().map(|&(_, i)| i).collect();
        assert_eq!(reversed, select(&keys, 4));
        assert_eq!(reversed, vec![5, 1, 2, 4]);
    }

    #[test]
    fn fewer_candidates_than_k_keeps_them_all() {
        assert_eq!(select(&[1.0, 2.0], 5), vec![1, 0]);
        assert!(select(&[], 3).is_empty());
    }

    #[test]
    fn negative_and_infinite_keys_are_ordered() {
        assert_eq!(select(&[f32::NEG_INFINITY, -2.0, f32::INFINITY, -0.5], 4), vec![2, 3, 1, 0]);
    }
}
