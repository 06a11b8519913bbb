//! How strong a condition is over time: one language for IP-Adapters, ControlNets and
//! T2I-Adapters.
//!
//! `scale` is a number (every active step), a list with one value per step, or a named curve
//! (`{ramp: [from, to]}`: linear over the active steps). `start` / `end` pick the active steps
//! by diffusers' window rule ([`active_at`]). Everything resolves at plan time to
//! one weight per step, which `ipcompose validate` prints and the loop reads.

use serde::{Deserialize, Serialize};

/// `scale:` as a recipe writes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Strength {
    Constant(f64),
    PerStep(Vec<f64>),
    Curve(Curve),
}

/// A named curve over the active steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Curve {
    /// Linear from the first value (first active step) to the second (last active step).
    pub ramp: [f64; 2],
}

/// What `scale` may be, for messages.
pub const STRENGTH_FORMS: &str = "a number, a list with one number per step, or {ramp: [from, to]}";

impl Strength {
    /// Reads the forms shared by every condition; `None` when `value` is none of them (so
    /// IP-Adapters can try their per-layer forms).
    pub fn from_value(value: &serde_yaml::Value) -> Option<std::result::Result<Self, String>> {
        use serde_yaml::Value;
        match value {
            Value::Number(n) => Some(
                n.as_f64()
                    .map(Strength::Constant)
                    .ok_or_else(|| format!("`{n:?}` is not a number")),
            ),
            Value::Sequence(items) => Some(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.as_f64().ok_or_else(|| {
                            format!("scale list item {i} must be a number ({STRENGTH_FORMS})")
                        })
                    })
                    .collect::<std::result::Result<Vec<f64>, String>>()
                    .map(Strength::PerStep),
            ),
            Value::Mapping(map) if map.contains_key("ramp") => Some(
                serde_yaml::from_value::<Curve>(value.clone())
                    .map(Strength::Curve)
                    .map_err(|e| format!("{e} (a curve is {{ramp: [from, to]}})")),
            ),
            _ => None,
        }
    }

    /// One weight per step (0 where inactive): `active[i]` says whether step `i` is inside
    /// the condition's window.
    pub fn per_step(&self, active: &[bool]) -> std::result::Result<Vec<f64>, String> {
        let steps = active.len();
        let values: Vec<f64> = match self {
            Strength::Constant(v) => active.iter().map(|&a| if a { *v } else { 0.0 }).collect(),
            Strength::PerStep(values) => {
                if values.len() != steps {
                    return Err(format!(
                        "a scale list needs one value per step: {} values for {steps} steps",
                        values.len()
                    ));
                }
                values
                    .iter()
                    .zip(active)
                    .map(|(&v, &a)| if a { v } else { 0.0 })
                    .collect()
            }
            Strength::Curve(Curve { ramp: [from, to] }) => {
                let count = active.iter().filter(|&&a| a).count();
                let mut j = 0usize;
                active
                    .iter()
                    .map(|&a| {
                        if !a {
                            return 0.0;
                        }
                        let t = if count > 1 {
                            j as f64 / (count - 1) as f64
                        } else {
                            0.0
                        };
                        j += 1;
                        // Exact at both ends (`from + (to - from) * t` can miss `to`).
                        from * (1.0 - t) + to * t
                    })
                    .collect()
            }
        };
        if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
            return Err(format!("scale values must be finite numbers, got {bad}"));
        }
        Ok(values)
    }
}

impl<'de> Deserialize<'de> for Strength {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let value = serde_yaml::Value::deserialize(d)?;
        match Strength::from_value(&value) {
            Some(result) => result.map_err(serde::de::Error::custom),
            None => Err(serde::de::Error::custom(format!(
                "scale must be {STRENGTH_FORMS}"
            ))),
        }
    }
}

/// diffusers' window rule per step: active unless `i/n < start` or `(i+1)/n > end`.
pub fn window(steps: usize, start: f64, end: f64) -> Vec<bool> {
    (0..steps)
        .map(|i| crate::recipe::schedule::active_at(i, steps, start, end))
        .collect()
}

/// diffusers' window rule (shared with ControlNet): step `i` of `n` is active unless
/// `i/n < start` or `(i+1)/n > end`.
pub fn active_at(step: usize, steps: usize, start: f64, end: f64) -> bool {
    let (i, n) = (step as f64, steps as f64);
    !(i / n < start || (i + 1.0) / n > end)
}

/// Whether a T2I-Adapter applies at `step`: inside its window and while
/// `step < ⌊steps · factor⌋` (the SDXL adapter pipeline's `adapter_conditioning_factor`).
pub fn t2i_active_at(step: usize, steps: usize, start: f64, end: f64, factor: f64) -> bool {
    active_at(step, steps, start, end) && step < (steps as f64 * factor).floor() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> std::result::Result<Strength, String> {
        serde_yaml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn forms_parse() {
        assert_eq!(parse("0.5").unwrap(), Strength::Constant(0.5));
        assert_eq!(
            parse("[1, 0.5]").unwrap(),
            Strength::PerStep(vec![1.0, 0.5])
        );
        assert_eq!(
            parse("{ramp: [1.0, 0.3]}").unwrap(),
            Strength::Curve(Curve { ramp: [1.0, 0.3] })
        );
        assert!(parse("{ramp: [1.0]}").is_err());
        assert!(parse("{ramp: [1, 2], ease: 3}")
            .unwrap_err()
            .contains("unknown field `ease`"));
        assert!(parse("fast").unwrap_err().contains("a number, a list"));
        assert!(parse("[1, x]").unwrap_err().contains("item 1"));
    }

    #[test]
    fn ramp_spans_the_active_steps_only() {
        let ramp = Strength::Curve(Curve { ramp: [1.0, 0.3] });
        let all = ramp.per_step(&window(4, 0.0, 1.0)).unwrap();
        let expected = [1.0, 1.0 - 0.7 / 3.0, 1.0 - 1.4 / 3.0, 0.3];
        for (a, b) in all.iter().zip(expected) {
            assert!((a - b).abs() < 1e-12, "{all:?}");
        }
        let late = ramp.per_step(&window(4, 0.25, 1.0)).unwrap();
        assert_eq!(late[0], 0.0);
        assert!((late[2] - 0.65).abs() < 1e-12, "{late:?}");
        assert_eq!(late[3], 0.3);
        let single = ramp.per_step(&[false, true, false]).unwrap();
        assert_eq!(single, [0.0, 1.0, 0.0]);
    }

    #[test]
    fn lists_need_one_value_per_step_and_respect_the_window() {
        let list = Strength::PerStep(vec![0.2, 0.9, 0.5, 0.1]);
        assert_eq!(
            list.per_step(&window(4, 0.0, 0.75)).unwrap(),
            [0.2, 0.9, 0.5, 0.0]
        );
        let err = list.per_step(&window(5, 0.0, 1.0)).unwrap_err();
        assert!(err.contains("4 values for 5 steps"), "{err}");
        assert_eq!(
            Strength::Constant(0.8)
                .per_step(&window(4, 0.25, 0.75))
                .unwrap(),
            [0.0, 0.8, 0.8, 0.0]
        );
    }

    #[test]
    fn window_follows_diffusers_rule() {
        let active: Vec<bool> = (0..4).map(|i| active_at(i, 4, 0.25, 0.75)).collect();
        assert_eq!(active, [false, true, true, false]);
        assert!((0..10).all(|i| active_at(i, 10, 0.0, 1.0)));
    }

    #[test]
    fn factor_limits_the_steps() {
        let active: Vec<bool> = (0..4)
            .map(|i| t2i_active_at(i, 4, 0.0, 1.0, 0.75))
            .collect();
        assert_eq!(active, [true, true, true, false]);
    }
}
