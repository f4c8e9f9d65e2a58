//! The shuffle buffer of streamed data (webdataset's `shuffle(bufsize)`): samples enter in shard order; once the
//! buffer is full, each new one sends out a uniformly drawn one; at the end of the epoch the rest leave in drawn
//! order. A sample can thus move up to `capacity` places earlier and arbitrarily later; with shuffled shards
//! that mixes an epoch well while holding only `capacity` samples (positions, not images, for tar shards).
use crate::rng::TorchGenerator;

pub struct ShuffleBuffer<T> {
    items: Vec<T>,
    capacity: usize,
}

impl<T> ShuffleBuffer<T> {
    /// A buffer of `capacity` samples (at least 1: then samples pass in order).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self { items: Vec::with_capacity(capacity), capacity }
    }

    /// Adds `item`; when the buffer is full, takes a random one out.
    pub fn push(&mut self, item: T, rng: &mut TorchGenerator) -> Option<T> {
        self.items.push(item);
        (self.items.len() >= self.capacity).then(|| self.pick(rng))
    }

    /// A random item of what is left (the end of an epoch), `None` when empty.
    pub fn pop(&mut self, rng: &mut TorchGenerator) -> Option<T> {
        (!self.items.is_empty()).then(|| self.pick(rng))
    }

    /// Draws one uniformly (as webdataset's `pick`: swap it with the last, pop).
    fn pick(&mut self, rng: &mut TorchGenerator) -> T {
        let k = rng.random() as usize % self.items.len();
        self.items.swap_remove(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(capacity: usize, n: usize, seed: u64) -> Vec<usize> {
        let mut rng = TorchGenerator::new(seed);
        let mut b = ShuffleBuffer::new(capacity);
        let mut out: Vec<usize> = (0..n).filter_map(|i| b.push(i, &mut rng)).collect();
        while let Some(x) = b.pop(&mut rng) {
            out.push(x);
        }
        out
    }

    #[test]
    fn every_item_leaves_once_in_a_seeded_order() {
        let a = run(8, 50, 1);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(a, sorted, "a buffer of 8 left 50 items in order");
        assert_eq!(a, run(8, 50, 1));
        assert_ne!(a, run(8, 50, 2));
        // No item leaves more than `capacity - 1` places early.
        assert!(a.iter().enumerate().all(|(pos, &i)| i <= pos + 7), "{a:?}");
        assert_eq!(run(1, 5, 1), [0, 1, 2, 3, 4]);
    }
}
