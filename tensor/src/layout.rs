//! Shape, strides and offset: how a tensor's elements sit in its storage.
//!
//! All view arithmetic lives here and never touches storage. Strides and the offset count elements,
//! not bytes. Every index computation is overflow-checked.

use crate::TensorError;

/// The strided view of a tensor over its storage.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Layout {
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

impl Layout {
    /// Row-major contiguous layout of `shape`, starting at element 0.
    pub fn contiguous(shape: &[usize]) -> Result<Self, TensorError> {
        let strides = contiguous_strides(shape)?;
        Ok(Layout { shape: shape.to_vec(), strides, offset: 0 })
    }

    /// An arbitrary strided layout. The element count and the span must fit `usize`.
    pub fn strided(shape: &[usize], strides: &[usize], offset: usize) -> Result<Self, TensorError> {
        if shape.len() != strides.len() {
            return Err(TensorError::SizeMismatch {
                what: "strides",
                shape: shape.to_vec(),
                needed: shape.len(),
                given: strides.len(),
            });
        }
        let layout = Layout { shape: shape.to_vec(), strides: strides.to_vec(), offset };
        layout.elem_count_checked()?;
        layout.span_checked()?;
        Ok(layout)
    }

    /// The extent of each dimension.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The distance in elements between neighbours along each dimension.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// The index of the first element in the storage, in elements.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Number of elements. Checked at construction, so it cannot overflow here.
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    fn elem_count_checked(&self) -> Result<usize, TensorError> {
        self.shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| TensorError::Overflow(self.shape.clone()))
    }

    /// One past the largest storage element index the view touches (`offset` when it is empty).
    pub fn span(&self) -> usize {
        // Checked at construction; a layout that exists has a span that fits.
        self.span_checked().unwrap_or(usize::MAX)
    }

    fn span_checked(&self) -> Result<usize, TensorError> {
        let overflow = || TensorError::Overflow(self.shape.clone());
        if self.shape.contains(&0) {
            return Ok(self.offset);
        }
        let mut last = self.offset;
        for (&d, &s) in self.shape.iter().zip(&self.strides) {
            let step = (d - 1).checked_mul(s).ok_or_else(overflow)?;
            last = last.checked_add(step).ok_or_else(overflow)?;
        }
        last.checked_add(1).ok_or_else(overflow)
    }

    /// Whether the elements are row-major and gap-free (size-1 dimensions may have any stride).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1usize;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected = expected.saturating_mul(d);
        }
        true
    }

    fn check_dim(&self, dim: usize) -> Result<(), TensorError> {
        if dim < self.rank() {
            Ok(())
        } else {
            Err(TensorError::DimOutOfRange { dim, rank: self.rank() })
        }
    }

    /// The sub-view `start .. start + len` along `dim`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Self, TensorError> {
        self.check_dim(dim)?;
        let size = self.shape[dim];
        let out_of_range = TensorError::NarrowOutOfRange { dim, start, len, size };
        match start.checked_add(len) {
            Some(end) if end <= size => {}
            _ => return Err(out_of_range),
        }
        let mut out = self.clone();
        out.shape[dim] = len;
        if len > 0 {
            // In range of the original span, so it cannot overflow.
            out.offset = self.offset + start * self.strides[dim];
        }
        Ok(out)
    }

    /// Swaps two dimensions.
    pub fn transpose(&self, dim0: usize, dim1: usize) -> Result<Self, TensorError> {
        self.check_dim(dim0)?;
        self.check_dim(dim1)?;
        let mut out = self.clone();
        out.shape.swap(dim0, dim1);
        out.strides.swap(dim0, dim1);
        Ok(out)
    }

    /// Reorders the dimensions: dimension `i` of the result is dimension `perm[i]` of `self`.
    pub fn permute(&self, perm: &[usize]) -> Result<Self, TensorError> {
        let rank = self.rank();
        let mut seen = vec![false; rank];
        let valid = perm.len() == rank
            && perm.iter().all(|&p| p < rank && !std::mem::replace(&mut seen[p], true));
        if !valid {
            return Err(TensorError::InvalidPermutation { perm: perm.to_vec(), rank });
        }
        Ok(Layout {
            shape: perm.iter().map(|&p| self.shape[p]).collect(),
            strides: perm.iter().map(|&p| self.strides[p]).collect(),
            offset: self.offset,
        })
    }

    /// The same elements viewed with a new shape, if the strides allow it without a copy.
    ///
    /// Works dimension group by dimension group: each run of old dimensions that is contiguous in
    /// memory may be split or merged freely; a new dimension may not straddle two runs.
    pub fn reshape(&self, new_shape: &[usize]) -> Result<Self, TensorError> {
        let new_count = new_shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| TensorError::Overflow(new_shape.to_vec()))?;
        if new_count != self.elem_count() {
            return Err(TensorError::SizeMismatch {
                what: "elements",
                shape: new_shape.to_vec(),
                needed: new_count,
                given: self.elem_count(),
            });
        }
        let needs_copy = || TensorError::ReshapeNeedsCopy {
            from: self.shape.clone(),
            strides: self.strides.clone(),
            to: new_shape.to_vec(),
        };
        if self.is_contiguous() || new_count == 0 {
            let mut out = Layout::contiguous(new_shape)?;
            out.offset = self.offset;
            return Ok(out);
        }
        // Old dimensions of size 1 carry no information; drop them.
        let old: Vec<(usize, usize)> = self
            .shape
            .iter()
            .zip(&self.strides)
            .filter(|(d, _)| **d != 1)
            .map(|(&d, &s)| (d, s))
            .collect();
        let mut new_strides = vec![0usize; new_shape.len()];
        let (mut oi, mut ni) = (0usize, 0usize);
        while ni < new_shape.len() {
            if new_shape[ni] == 1 {
                new_strides[ni] = 1;
                ni += 1;
                continue;
            }
            // Take one run of old dimensions that is contiguous in memory.
            let mut run_elems = 1usize;
            loop {
                let Some(&(d, s)) = old.get(oi) else { return Err(needs_copy()) };
                run_elems *= d;
                oi += 1;
                let continues = old.get(oi).is_some_and(|&(d2, s2)| d2.checked_mul(s2) == Some(s));
                if !continues {
                    break;
                }
            }
            let run_inner_stride = old[oi - 1].1;
            // Cover exactly `run_elems` with new dimensions, innermost stride last.
            let group_start = ni;
            let mut covered = 1usize;
            while covered < run_elems {
                let Some(&d) = new_shape.get(ni) else { return Err(needs_copy()) };
                covered = covered.checked_mul(d).ok_or_else(needs_copy)?;
                ni += 1;
            }
            if covered != run_elems {
                return Err(needs_copy());
            }
            let mut stride = run_inner_stride;
            for j in (group_start..ni).rev() {
                new_strides[j] = stride;
                stride = stride.saturating_mul(new_shape[j]);
            }
        }
        if oi != old.len() {
            return Err(needs_copy());
        }
        Layout::strided(new_shape, &new_strides, self.offset)
    }

    /// Storage element indices of every element, in row-major order of the view.
    pub fn indices(&self) -> impl Iterator<Item = usize> + '_ {
        let count = self.elem_count();
        let mut index = vec![0usize; self.rank()];
        let mut position = self.offset;
        (0..count).map(move |n| {
            if n > 0 {
                // Advance the multi-index like an odometer.
                for dim in (0..index.len()).rev() {
                    index[dim] += 1;
                    position += self.strides[dim];
                    if index[dim] < self.shape[dim] {
                        break;
                    }
                    position -= self.strides[dim] * self.shape[dim];
                    index[dim] = 0;
                }
            }
            position
        })
    }
}

/// Row-major strides for `shape`, checked for overflow.
pub(crate) fn contiguous_strides(shape: &[usize]) -> Result<Vec<usize>, TensorError> {
    let mut strides = vec![0usize; shape.len()];
    let mut acc = 1usize;
    for (stride, &d) in strides.iter_mut().zip(shape).rev() {
        *stride = acc;
        acc = acc.checked_mul(d).ok_or_else(|| TensorError::Overflow(shape.to_vec()))?;
    }
    Ok(strides)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_layouts() {
        let l = Layout::contiguous(&[2, 3, 4]).unwrap();
        assert_eq!(l.strides(), &[12, 4, 1]);
        assert!(l.is_contiguous());
        assert_eq!(l.elem_count(), 24);
        assert_eq!(l.span(), 24);
        assert_eq!(Layout::contiguous(&[]).unwrap().elem_count(), 1);
        assert!(matches!(Layout::contiguous(&[usize::MAX, 2]), Err(TensorError::Overflow(_))));
    }

    #[test]
    fn narrow_and_transpose_are_views() {
        let l = Layout::contiguous(&[4, 5]).unwrap();
        let n = l.narrow(1, 2, 3).unwrap();
        assert_eq!((n.shape(), n.strides(), n.offset()), (&[4, 3][..], &[5, 1][..], 2));
        assert!(!n.is_contiguous());
        let t = l.transpose(0, 1).unwrap();
        assert_eq!((t.shape(), t.strides()), (&[5, 4][..], &[1, 5][..]));
        assert!(l.narrow(1, 3, 3).is_err());
        assert!(l.narrow(1, usize::MAX, 2).is_err());
        assert!(l.narrow(2, 0, 1).is_err());
        assert!(l.transpose(0, 2).is_err());
        assert_eq!(l.narrow(0, 4, 0).unwrap().elem_count(), 0);
    }

    #[test]
    fn permute_checks_the_permutation() {
        let l = Layout::contiguous(&[2, 3, 4]).unwrap();
        let p = l.permute(&[2, 0, 1]).unwrap();
        assert_eq!((p.shape(), p.strides()), (&[4, 2, 3][..], &[1, 12, 4][..]));
        for bad in [&[0, 1][..], &[0, 1, 1], &[0, 1, 3]] {
            assert!(matches!(l.permute(bad), Err(TensorError::InvalidPermutation { .. })));
        }
    }

    #[test]
    fn reshape_views_when_strides_allow() {
        let l = Layout::contiguous(&[2, 3, 4]).unwrap();
        assert_eq!(l.reshape(&[6, 4]).unwrap().strides(), &[4, 1]);
        // A narrowed outer dimension keeps the inner run contiguous: merge/split inside it.
        let n = Layout::contiguous(&[4, 3, 4]).unwrap().narrow(0, 1, 2).unwrap();
        let r = n.reshape(&[2, 12]).unwrap();
        assert_eq!((r.strides(), r.offset()), (&[12, 1][..], 12));
        let r = n.reshape(&[2, 3, 2, 2]).unwrap();
        assert_eq!(r.strides(), &[12, 4, 2, 1]);
        // A transposed matrix cannot be flattened without a copy.
        let t = Layout::contiguous(&[3, 4]).unwrap().transpose(0, 1).unwrap();
        assert!(matches!(t.reshape(&[12]), Err(TensorError::ReshapeNeedsCopy { .. })));
        // But size-1 dimensions can be added to it.
        let u = t.reshape(&[4, 1, 3]).unwrap();
        assert_eq!((u.shape(), u.strides()[0], u.strides()[2]), (&[4, 1, 3][..], 1, 4));
        assert!(matches!(l.reshape(&[5, 5]), Err(TensorError::SizeMismatch { .. })));
    }

    #[test]
    fn reshaped_views_address_the_same_elements() {
        let base = Layout::contiguous(&[6, 4, 5]).unwrap();
        let cases: Vec<(Layout, Vec<usize>)> = vec![
            (base.narrow(0, 1, 4).unwrap(), vec![2, 2, 20]),
            (base.narrow(2, 0, 5).unwrap().narrow(0, 2, 2).unwrap(), vec![8, 5]),
            (base.transpose(0, 2).unwrap(), vec![5, 4, 3, 2]),
            (base.transpose(1, 2).unwrap(), vec![6, 5, 4]),
        ];
        for (view, shape) in cases {
            let expected: Vec<usize> = view.indices().collect();
            match view.reshape(&shape) {
                Ok(r) => assert_eq!(r.indices().collect::<Vec<_>>(), expected, "{shape:?}"),
                Err(TensorError::ReshapeNeedsCopy { .. }) => {}
                Err(e) => panic!("unexpected {e}"),
            }
        }
    }

    #[test]
    fn indices_walk_strided_views() {
        let t = Layout::contiguous(&[2, 3]).unwrap().transpose(0, 1).unwrap();
        assert_eq!(t.indices().collect::<Vec<_>>(), vec![0, 3, 1, 4, 2, 5]);
        let n = Layout::contiguous(&[3, 4]).unwrap().narrow(1, 1, 2).unwrap();
        assert_eq!(n.indices().collect::<Vec<_>>(), vec![1, 2, 5, 6, 9, 10]);
        assert_eq!(n.span(), 11);
    }

    #[test]
    fn strided_layouts_check_their_span() {
        assert!(Layout::strided(&[2, 2], &[usize::MAX, 1], 0).is_err());
        assert!(Layout::strided(&[2], &[1, 1], 0).is_err());
        let l = Layout::strided(&[0, 7], &[usize::MAX, usize::MAX], 3).unwrap();
        assert_eq!((l.elem_count(), l.span()), (0, 3));
    }
}
