//! numpy's `SeedSequence` (O'Neill's seed_seq hash, as numpy 1.17+ implements it): turns an integer entropy
//! and a spawn key into well-mixed 32-bit seeds. torchsde seeds every node of its Brownian tree this way
//! (`SeedSequence(entropy, spawn_key=(key, depth), pool_size=24).generate_state(4)`), so the port must give
//! the same words for the noise to match.
//!
//! All arithmetic is on wrapping u32, as numpy's `uint32` arrays.

/// Starting value and multiplier of the hash that mixes entropy words into the pool.
const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
/// Starting value and multiplier of the hash that reads output words out of the pool.
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
/// Multipliers of `mix`, which folds one pool word into another.
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
/// Half the word size: the xor-shift of every hash step.
const XSHIFT: u32 = 16;

/// The mixed entropy pool of one `SeedSequence(entropy, spawn_key, pool_size)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedSequence {
    pool: Vec<u32>,
}

impl SeedSequence {
    /// `np.random.SeedSequence(entropy=entropy, spawn_key=spawn_key, pool_size=pool_size)`.
    pub fn new(entropy: u64, spawn_key: &[u64], pool_size: usize) -> Self {
        // 1. Assemble the entropy words: the run entropy (zero-padded to the pool size when a spawn key
        //    follows, so keys cannot collide with longer entropy), then the spawn key's words.
        let mut words = u32_words(entropy);
        let spawn: Vec<u32> = spawn_key.iter().flat_map(|&k| u32_words(k)).collect();
        if !spawn.is_empty() && words.len() < pool_size {
            words.resize(pool_size, 0);
        }
        words.extend(spawn);

        // 2. Hash the first pool_size words into the pool (zeros past the end of the entropy).
        let mut hash_const = INIT_A;
        let mut hashmix = |value: u32| {
            let mut value = value ^ hash_const;
            hash_const = hash_const.wrapping_mul(MULT_A);
            value = value.wrapping_mul(hash_const);
            value ^ (value >> XSHIFT)
        };
        let mut pool: Vec<u32> = (0..pool_size).map(|i| hashmix(words.get(i).copied().unwrap_or(0))).collect();

        // 3. Mix every pool word into every other, so late words affect early ones.
        for src in 0..pool_size {
            for dst in 0..pool_size {
                if src != dst {
                    let hashed = hashmix(pool[src]);
                    pool[dst] = mix(pool[dst], hashed);
                }
            }
        }
        // 4. Entropy beyond the pool size is mixed into every pool word.
        for &word in words.iter().skip(pool_size) {
            for slot in pool.iter_mut() {
                *slot = mix(*slot, hashmix(word));
            }
        }
        Self { pool }
    }

    /// `generate_state(n_words)` with dtype uint32: the pool read out cyclically through a second hash.
    pub fn generate_state(&self, n_words: usize) -> Vec<u32> {
        let mut hash_const = INIT_B;
        (0..n_words)
            .map(|i| {
                let mut value = self.pool[i % self.pool.len()] ^ hash_const;
                hash_const = hash_const.wrapping_mul(MULT_B);
                value = value.wrapping_mul(hash_const);
                value ^ (value >> XSHIFT)
            })
            .collect()
    }
}

/// `mix(x, y)`: folds y into x.
fn mix(x: u32, y: u32) -> u32 {
    let result = MIX_MULT_L.wrapping_mul(x).wrapping_sub(MIX_MULT_R.wrapping_mul(y));
    result ^ (result >> XSHIFT)
}

/// An integer as numpy's `_int_to_uint32_array`: 32-bit words, least significant first; 0 is one word.
fn u32_words(mut n: u64) -> Vec<u32> {
    if n == 0 {
        return vec![0];
    }
    let mut words = Vec::new();
    while n > 0 {
        words.push(n as u32);
        n >>= 32;
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Words numpy 2.4 printed for `SeedSequence(entropy, spawn_key=key, pool_size=24).generate_state(...)`.
    #[test]
    fn matches_numpy() {
        assert_eq!(SeedSequence::new(12345, &[], 24).generate_state(3), [2888090517, 4151165838, 1159728038]);
        assert_eq!(
            SeedSequence::new(12345, &[5, 3], 24).generate_state(4),
            [173650277, 1015160349, 1939661955, 1198629348]
        );
        // Two-word entropy and a two-word spawn key.
        assert_eq!(
            SeedSequence::new((1 << 62) + 7, &[(1 << 40) + 3, 41], 24).generate_state(4),
            [3065064835, 2149473638, 1456697257, 2249104733]
        );
    }

    #[test]
    fn words_are_least_significant_first() {
        assert_eq!(u32_words(0), [0]);
        assert_eq!(u32_words(5), [5]);
        assert_eq!(u32_words((3 << 32) + 9), [9, 3]);
    }
}
