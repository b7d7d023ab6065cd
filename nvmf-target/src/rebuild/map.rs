//! A bitmap of fixed-size segments of a device: the unit a rebuild copies and a write log records.

/// Segment bitmap over a device of `size` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentMap {
    segment: u64,
    size: u64,
    bits: Vec<u64>,
}

impl SegmentMap {
    /// No segment marked. `segment` must be a power of two.
    pub fn empty(size: u64, segment: u64) -> SegmentMap {
        let n = size.div_ceil(segment);
        SegmentMap {
            segment,
            size,
            bits: vec![0; n.div_ceil(64) as usize],
        }
    }

    /// Every segment marked.
    pub fn full(size: u64, segment: u64) -> SegmentMap {
        let mut m = Self::empty(size, segment);
        m.mark(0, size);
        m
    }

    pub fn segment_size(&self) -> u64 {
        self.segment
    }

    pub fn device_size(&self) -> u64 {
        self.size
    }

    fn segments(&self) -> u64 {
        self.size.div_ceil(self.segment)
    }

    /// Marks every segment that `offset..offset+len` touches.
    pub fn mark(&mut self, offset: u64, len: u64) {
        self.mark_new(offset, len);
    }

    /// Marks like [`SegmentMap::mark`]; returns the byte range of the segments that were not marked before,
    /// if any (the first to the last newly marked one).
    pub fn mark_new(&mut self, offset: u64, len: u64) -> Option<std::ops::Range<u64>> {
        if len == 0 || offset >= self.size {
            return None;
        }
        let end = (offset + len).min(self.size);
        let mut new: Option<std::ops::Range<u64>> = None;
        for s in offset / self.segment..end.div_ceil(self.segment) {
            let (w, b) = ((s / 64) as usize, 1u64 << (s % 64));
            if self.bits[w] & b == 0 {
                self.bits[w] |= b;
                let r = s * self.segment..((s + 1) * self.segment).min(self.size);
                new = Some(match new {
                    Some(n) => n.start..r.end,
                    None => r,
                });
            }
        }
        new
    }

    pub fn is_marked(&self, segment: u64) -> bool {
        segment < self.segments() && self.bits[(segment / 64) as usize] & (1 << (segment % 64)) != 0
    }

    /// Number of marked segments.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Bytes covered by marked segments (the last segment may be short).
    pub fn marked_bytes(&self) -> u64 {
        self.ranges().map(|r| r.end - r.start).sum()
    }

    /// Marked byte ranges, one per segment, ascending. Words with no mark are skipped whole: a sparse map of a
    /// large device costs its words, not its segments.
    pub fn ranges(&self) -> impl Iterator<Item = std::ops::Range<u64>> + '_ {
        let segments = self.segments();
        self.bits
            .iter()
            .enumerate()
            .filter(|(_, w)| **w != 0)
            .flat_map(|(i, &w)| {
                let mut left = w;
                std::iter::from_fn(move || {
                    if left == 0 {
                        return None;
                    }
                    let b = u64::from(left.trailing_zeros());
                    left &= left - 1;
                    Some(i as u64 * 64 + b)
                })
            })
            .take_while(move |&s| s < segments)
            .map(|s| s * self.segment..((s + 1) * self.segment).min(self.size))
    }

    /// Marked byte ranges with neighbouring segments merged, ascending, each at most `max` bytes and never
    /// crossing a multiple of `max` (so runs line up with a destination's clusters when `max` is their size).
    pub fn runs(&self, max: u64) -> impl Iterator<Item = std::ops::Range<u64>> + '_ {
        let max = max.max(self.segment);
        let mut segs = self.ranges().peekable();
        std::iter::from_fn(move || {
            let mut run = segs.next()?;
            while let Some(next) = segs.peek() {
                if next.start != run.end || run.end % max == 0 {
                    break;
                }
                run.end = next.end;
                segs.next();
            }
            Some(run)
        })
    }

    /// Unmarks every segment that lies wholly inside `range`.
    pub fn clear(&mut self, range: std::ops::Range<u64>) {
        for s in range.start.div_ceil(self.segment)..(range.end / self.segment).min(self.segments())
        {
            self.bits[(s / 64) as usize] &= !(1 << (s % 64));
        }
        if range.end >= self.size && !self.size.is_multiple_of(self.segment) {
            let last = self.segments() - 1;
            if range.start <= last * self.segment {
                self.bits[(last / 64) as usize] &= !(1 << (last % 64));
            }
        }
    }

    /// Whether any segment that `offset..offset+len` touches is marked.
    pub fn overlaps(&self, offset: u64, len: u64) -> bool {
        let end = (offset + len).min(self.size);
        len > 0
            && offset < end
            && (offset / self.segment..end.div_ceil(self.segment)).any(|s| self.is_marked(s))
    }

    /// Whether every segment that `offset..offset+len` touches is marked.
    pub fn covers(&self, offset: u64, len: u64) -> bool {
        let end = (offset + len).min(self.size);
        len > 0
            && offset < end
            && (offset / self.segment..end.div_ceil(self.segment)).all(|s| self.is_marked(s))
    }

    /// Extends the map to a device grown to `size` bytes; the new segments are unmarked. A smaller `size` changes
    /// nothing.
    pub fn grow(&mut self, size: u64) {
        if size <= self.size {
            return;
        }
        self.size = size;
        self.bits
            .resize(size.div_ceil(self.segment).div_ceil(64) as usize, 0);
    }

    /// Unmarks every segment.
    pub fn clear_all(&mut self) {
        self.bits.fill(0);
    }

    /// Marks everything `other` marks (same geometry).
    pub fn union(&mut self, other: &SegmentMap) {
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= b;
        }
    }

    /// The raw words, for persisting.
    pub fn words(&self) -> &[u64] {
        &self.bits
    }

    /// Rebuilds a map from persisted words; `None` if they do not fit the geometry.
    pub fn from_words(size: u64, segment: u64, words: Vec<u64>) -> Option<SegmentMap> {
        let m = Self::empty(size, segment);
        (words.len() == m.bits.len()).then_some(SegmentMap { bits: words, ..m })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn marks_touched_segments() {
        let mut m = SegmentMap::empty(10 << 20, 1 << 20);
        m.mark(1024, 512);
        m.mark((3 << 20) - 512, 1024);
        assert_eq!(m.count(), 3);
        assert!(m.is_marked(0) && m.is_marked(2) && m.is_marked(3));
        assert_eq!(m.marked_bytes(), 3 << 20);
        let full = SegmentMap::full((5 << 20) + 4096, 1 << 20);
        assert_eq!(full.count(), 6);
        assert_eq!(full.marked_bytes(), (5 << 20) + 4096);
    }

    #[test]
    fn runs_merge_neighbours_up_to_aligned_max() {
        let mut m = SegmentMap::empty((10 << 20) + 4096, 1 << 20);
        m.mark(0, 6 << 20); // segments 0-5
        m.mark(7 << 20, 1); // 7
        m.mark(9 << 20, 2 << 20); // 9 and the short last one
        let runs: Vec<_> = m.runs(4 << 20).collect();
        assert_eq!(
            runs,
            vec![
                0..4 << 20,
                4 << 20..6 << 20,
                7 << 20..8 << 20,
                9 << 20..(10 << 20) + 4096
            ]
        );
        let total: u64 = runs.iter().map(|r| r.end - r.start).sum();
        assert_eq!(total, m.marked_bytes());
        assert_eq!(m.runs(1).count() as u64, m.count());
    }

    #[test]
    fn clear_and_covers() {
        let mut m = SegmentMap::full((4 << 20) + 4096, 1 << 20);
        assert!(m.covers(4096, 3 << 20));
        m.clear(1 << 20..3 << 20);
        assert!(!m.covers(0, (1 << 20) + 1) && m.covers(0, 1 << 20) && m.covers(3 << 20, 1 << 20));
        m.clear((1 << 20) + 5..(3 << 20) + 7); // touches 1-3 but covers none wholly
        assert!(m.is_marked(3));
        m.clear(4 << 20..(4 << 20) + 4096);
        assert!(!m.is_marked(4));
        assert_eq!(m.count(), 2);
        assert!(!m.covers(0, 0));
    }

    proptest! {
        #[test]
        fn every_written_byte_is_in_a_marked_range(writes in prop::collection::vec((0u64..1 << 24, 1u64..1 << 18), 0..20)) {
            let size = 1 << 24;
            let mut m = SegmentMap::empty(size, 1 << 16);
            for &(o, l) in &writes { m.mark(o, l); }
            let ranges: Vec<_> = m.ranges().collect();
            for &(o, l) in &writes {
                let end = (o + l).min(size);
                for probe in [o, end - 1, (o + end) / 2] {
                    prop_assert!(ranges.iter().any(|r| r.contains(&probe)));
                }
            }
            let again = SegmentMap::from_words(size, 1 << 16, m.words().to_vec()).unwrap();
            prop_assert_eq!(again, m);
        }

        #[test]
        fn ranges_are_the_marked_segments_in_order(size in 1u64..1 << 22, marks in prop::collection::vec((0u64..1 << 22, 1u64..1 << 16), 0..40)) {
            let mut m = SegmentMap::empty(size, 4096);
            for &(o, l) in &marks { m.mark(o, l); }
            let slow: Vec<_> = (0..size.div_ceil(4096))
                .filter(|&s| m.is_marked(s))
                .map(|s| s * 4096..((s + 1) * 4096).min(size))
                .collect();
            prop_assert_eq!(m.ranges().collect::<Vec<_>>(), slow);
        }
    }
}
