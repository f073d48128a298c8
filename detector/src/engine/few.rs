//! [`Few`]: none, one or several values, in the space of one value.

use std::ops::{Deref, DerefMut};

/// None, one or several values, as small as one value when `T` has spare bit patterns (a
/// `bool` field): the two tag values it needs are taken from those. Every flow in the engine's
/// table holds two (its live entries and its agent keys), almost always with one value each;
/// a `SmallVec` would add a length word to each. The size test in `shadow` holds it to that.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum Few<T> {
    #[default]
    None,
    One(T),
    /// Two or more.
    Many(Vec<T>),
}

impl<T> Deref for Few<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match self {
            Few::None => &[],
            Few::One(t) => std::slice::from_ref(t),
            Few::Many(v) => v,
        }
    }
}

impl<T> DerefMut for Few<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match self {
            Few::None => &mut [],
            Few::One(t) => std::slice::from_mut(t),
            Few::Many(v) => v,
        }
    }
}

impl<T> Few<T> {
    pub(crate) fn push(&mut self, t: T) {
        *self = match std::mem::take(self) {
            Few::None => Few::One(t),
            Few::One(first) => Few::Many(vec![first, t]),
            Few::Many(mut v) => {
                v.push(t);
                Few::Many(v)
            }
        };
    }

    /// Keeps the values `keep` says yes to, in order. Allocates nothing: it runs on every
    /// destroy.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        match self {
            Few::None => {}
            Few::One(t) => {
                if !keep(t) {
                    *self = Few::None;
                }
            }
            Few::Many(v) => {
                v.retain(keep);
                if v.len() < 2 {
                    *self = Self::from_vec(std::mem::take(v));
                }
            }
        }
    }

    /// Removes value `i`, the last one taking its place.
    ///
    /// # Panics
    /// If `i` is out of bounds, as `Vec::swap_remove`.
    pub(crate) fn swap_remove(&mut self, i: usize) -> T {
        match std::mem::take(self) {
            Few::One(t) if i == 0 => t,
            other => {
                let mut v = other.into_vec();
                let t = v.swap_remove(i);
                *self = Self::from_vec(v);
                t
            }
        }
    }

    fn into_vec(self) -> Vec<T> {
        match self {
            Few::None => Vec::new(),
            Few::One(t) => vec![t],
            Few::Many(v) => v,
        }
    }

    fn from_vec(mut v: Vec<T>) -> Self {
        match v.len() {
            0 => Few::None,
            1 => v.pop().map_or(Few::None, Few::One),
            _ => Few::Many(v),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests: a panic is the failure report"
    )]
    use super::*;
    use crate::testutil::Rng;

    #[test]
    fn few_behaves_as_a_vec() {
        // A Vec is the model; pushes, retains and swap-removes through every size.
        let mut few: Few<u32> = Few::default();
        let mut model: Vec<u32> = Vec::new();
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for step in 0..5000u32 {
            let x = rng.next();
            match x % 4 {
                0 | 1 => {
                    few.push(step);
                    model.push(step);
                }
                2 if !model.is_empty() => {
                    let i = (x >> 8) as usize % model.len();
                    assert_eq!(few.swap_remove(i), model.swap_remove(i));
                }
                _ => {
                    let odd = x & 0x100 != 0;
                    few.retain(|v| (v % 2 == 1) == odd || v % 3 == 0);
                    model.retain(|v| (v % 2 == 1) == odd || v % 3 == 0);
                }
            }
            assert_eq!(&*few, model.as_slice(), "step {step}");
            // Its shape is the smallest that holds its values.
            let shape_ok = match &few {
                Few::None => model.is_empty(),
                Few::One(_) => model.len() == 1,
                Few::Many(_) => model.len() >= 2,
            };
            assert!(shape_ok, "step {step}: {few:?}");
        }
        for v in few.iter_mut() {
            *v += 1;
        }
        assert!(few.iter().zip(&model).all(|(a, b)| *a == b + 1));
    }
}
