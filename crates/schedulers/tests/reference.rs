//! Parity with diffusers 0.42.1 on the fixtures written by `tests/fixtures/make_fixtures.py`:
//! schedule tables for every case of `schedulers.json` and `cases.json`, and whole sampling
//! runs (fixed model outputs, recorded noise) from `scheduler_steps.*`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ipcompose_schedulers::{
    build_scheduler, PredictionType, ReplayNoise, Scheduler, SchedulerConfig, SchedulerKind,
};
use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

/// Timesteps and sigmas must agree to this relative error. Measured: worst 6.3e-7 over
/// schedulers.json (4812 of 5632 values bit-identical), 1.1e-7 over cases.json. The rest are
/// one-ulp differences: torch's vectorised float32 `sqrt` of the sigma table (and of 0-d
/// tensors) is not always correctly rounded, and numpy's SIMD `log`/`pow` in the Karras
/// conversion differ from libm in the last bit.
const TABLE_RELATIVE_TOLERANCE: f64 = 1e-4;

/// Largest allowed |ours − diffusers| of a sample after a full 6-step run. Measured final
/// max |Δ|: DDIM 3.8e-6 (ε) / 9.5e-7 (v), Euler 7.5e-9 / 3.6e-7, Euler Karras 7.6e-6 / 6.0e-7,
/// Euler a 3.8e-6 / 4.8e-7, DPM++ 2M 1.5e-5 / 1.2e-6, DPM++ 2M Karras 1.9e-5 / 9.5e-7; the
/// step arithmetic matches torch's, the residue comes from one-ulp differences in the scalar
/// coefficients (same `sqrt`/`log`/`exp` rounding as above).
const FINAL_ABSOLUTE_TOLERANCE: f32 = 1e-4;

fn fixture(relative: &str) -> PathBuf {
    let path = Path::new(FIXTURES).join(relative);
    assert!(
        path.exists(),
        "fixture {} is missing; run tests/fixtures/make_fixtures.py",
        path.display()
    );
    path
}

fn read_json(relative: &str) -> Value {
    let path = fixture(relative);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

fn config_with_overrides(base: SchedulerConfig, overrides: &Value) -> SchedulerConfig {
    let overrides = overrides.as_object().expect("overrides is an object");
    overrides.iter().fold(base, |config, (key, value)| {
        config
            .with_override(key, value.clone())
            .unwrap_or_else(|error| panic!("override {key}: {error}"))
    })
}

fn kind_of(case: &Value) -> SchedulerKind {
    case["kind"]
        .as_str()
        .expect("kind")
        .parse()
        .expect("known scheduler kind")
}

fn floats(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .expect("list")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// Tracks the worst relative error and how many values matched exactly.
#[derive(Default)]
struct Agreement {
    worst_relative: f64,
    exact: usize,
    total: usize,
}

impl Agreement {
    fn compare(&mut self, what: &str, actual: &[f64], expected: &[f64]) {
        assert_eq!(
            actual.len(),
            expected.len(),
            "{what}: length\n ours {actual:?}\n diffusers {expected:?}"
        );
        for (index, (&a, &e)) in actual.iter().zip(expected).enumerate() {
            let error = (a - e).abs();
            let relative = if e == 0.0 { error } else { error / e.abs() };
            assert!(
                relative <= TABLE_RELATIVE_TOLERANCE,
                "{what}[{index}]: ours {a}, diffusers {e}\n ours {actual:?}\n diffusers {expected:?}"
            );
            self.worst_relative = self.worst_relative.max(relative);
            self.exact += usize::from(a == e);
            self.total += 1;
        }
    }
}

fn compare_tables(label: &str, scheduler: &dyn Scheduler, case: &Value, agreement: &mut Agreement) {
    agreement.compare(
        &format!("{label} timesteps"),
        scheduler.timesteps(),
        &floats(&case["timesteps"]),
    );
    match (&case["sigmas"], scheduler.sigmas()) {
        (Value::Null, None) => {}
        (expected, Some(actual)) if !expected.is_null() => {
            agreement.compare(&format!("{label} sigmas"), actual, &floats(expected))
        }
        (expected, actual) => {
            panic!("{label}: sigmas presence differs: ours {actual:?}, diffusers {expected}")
        }
    }
    let init = case["init_noise_sigma"].as_f64().expect("init_noise_sigma");
    agreement.compare(
        &format!("{label} init_noise_sigma"),
        &[scheduler.init_noise_sigma()],
        &[init],
    );
}

#[test]
fn schedule_tables_match_diffusers() {
    let reference = read_json("reference/schedulers.json");
    let configs = &reference["configs"];
    let entries = reference["entries"].as_array().expect("entries");
    assert!(
        entries.len() >= 100,
        "schedulers.json has only {} entries",
        entries.len()
    );
    let mut agreement = Agreement::default();
    for case in entries {
        let label = format!(
            "{} {} {} steps {}",
            case["kind"], case["base_config"], case["overrides"], case["steps"]
        );
        assert!(
            case.get("error").is_none(),
            "{label}: diffusers recorded an error"
        );
        let base_name = case["base_config"].as_str().expect("base_config");
        let base =
            SchedulerConfig::from_json_str(&configs[base_name].to_string()).expect("base config");
        let config = config_with_overrides(base, &case["overrides"]);
        let kind = kind_of(case);
        let steps = case["steps"].as_u64().expect("steps") as usize;
        let scheduler = build_scheduler(kind, &config, steps)
            .unwrap_or_else(|error| panic!("{label}: {error}"));
        compare_tables(&label, scheduler.as_ref(), case, &mut agreement);
        let expected_prediction = match case["resolved_prediction_type"].as_str() {
            Some("v_prediction") => PredictionType::VPrediction,
            _ => PredictionType::Epsilon,
        };
        assert_eq!(
            config.prediction_type(kind).expect("prediction type"),
            expected_prediction,
            "{label}"
        );
    }
    eprintln!(
        "schedulers.json: {} entries, {}/{} values bit-identical, worst relative error {:e}",
        entries.len(),
        agreement.exact,
        agreement.total,
        agreement.worst_relative
    );
}

#[test]
fn pipeline_case_tables_match_diffusers() {
    let cases = read_json("reference/cases.json");
    let cases = cases.as_array().expect("cases list");
    assert!(!cases.is_empty());
    let mut agreement = Agreement::default();
    for case in cases {
        let label = case["name"].as_str().expect("name").to_owned();
        let folder = case["folder"].as_str().expect("folder");
        let config_path = fixture(&format!("{folder}/scheduler/scheduler_config.json"));
        let base = SchedulerConfig::from_file(&config_path).expect("scheduler config");
        let config = config_with_overrides(base, &case["scheduler"]["overrides"]);
        let kind = kind_of(&case["scheduler"]);
        let steps = case["steps"].as_u64().expect("steps") as usize;
        let scheduler = build_scheduler(kind, &config, steps)
            .unwrap_or_else(|error| panic!("{label}: {error}"));
        compare_tables(&label, scheduler.as_ref(), case, &mut agreement);
        let resolved = &case["scheduler"]["resolved_config"];
        let expected_prediction = match resolved["prediction_type"].as_str() {
            Some("v_prediction") => PredictionType::VPrediction,
            _ => PredictionType::Epsilon,
        };
        assert_eq!(
            config.prediction_type(kind).expect("prediction type"),
            expected_prediction,
            "{label}"
        );
    }
    eprintln!(
        "cases.json: {}/{} values bit-identical, worst relative error {:e}",
        agreement.exact, agreement.total, agreement.worst_relative
    );
}

fn max_abs_difference(a: &Tensor, b: &Tensor) -> f32 {
    a.sub(b)
        .and_then(|difference| difference.abs())
        .and_then(|difference| difference.flatten_all())
        .and_then(|difference| difference.max(0))
        .and_then(|maximum| maximum.to_scalar::<f32>())
        .expect("difference of two tensors of one shape")
}

#[test]
fn step_runs_match_diffusers() {
    let cases = read_json("reference/scheduler_steps.json");
    let cases = cases.as_array().expect("cases list");
    assert!(!cases.is_empty());
    let configs = read_json("reference/schedulers.json")["configs"].clone();
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixture("reference/scheduler_steps.safetensors"),
        &Device::Cpu,
    )
    .expect("scheduler_steps.safetensors");
    let tensor = |key: &str| {
        tensors
            .get(key)
            .unwrap_or_else(|| panic!("tensor {key} missing"))
            .clone()
    };
    let initial = tensor("sample");
    let mut worst_final = 0f32;
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let base_name = case["base_config"].as_str().expect("base_config");
        let base =
            SchedulerConfig::from_json_str(&configs[base_name].to_string()).expect("base config");
        let config = config_with_overrides(base, &case["overrides"]);
        let steps = case["steps"].as_u64().expect("steps") as usize;
        let mut scheduler = build_scheduler(kind_of(case), &config, steps).expect("scheduler");
        compare_tables(name, scheduler.as_ref(), case, &mut Agreement::default());

        let recorded_noise: Vec<Tensor> = (0..steps)
            .filter_map(|k| tensors.get(&format!("{name}.noise.{k}")).cloned())
            .collect();
        let mut noise = ReplayNoise::new(recorded_noise);
        let mut sample = initial
            .affine(scheduler.init_noise_sigma() as f32 as f64, 0.0)
            .expect("scaled sample");
        let mut worst_step = 0f32;
        for step_index in 0..steps {
            let model_output = tensor(&format!("{name}.eps.{step_index}"));
            let _unet_input = scheduler
                .scale_model_input(&sample, step_index)
                .expect("scale_model_input");
            sample = scheduler
                .step(&model_output, step_index, &sample, &mut noise)
                .expect("step");
            let expected = tensor(&format!("{name}.x.{step_index}"));
            worst_step = worst_step.max(max_abs_difference(&sample, &expected));
        }
        assert_eq!(noise.remaining(), 0, "{name}: recorded noise left unused");
        let difference = max_abs_difference(&sample, &tensor(&format!("{name}.final")));
        eprintln!("{name}: final max |Δ| = {difference:e} (worst intermediate {worst_step:e})");
        assert!(
            difference <= FINAL_ABSOLUTE_TOLERANCE,
            "{name}: final max |Δ| = {difference}"
        );
        worst_final = worst_final.max(difference);
    }
    eprintln!("scheduler_steps: worst final max |Δ| = {worst_final:e}");
}

#[test]
fn dpm_refuses_steps_out_of_order() {
    let config = SchedulerConfig::from_file(&fixture("tiny-sd15/scheduler/scheduler_config.json"))
        .expect("config");
    let mut scheduler = build_scheduler(SchedulerKind::DpmPp2m, &config, 5).expect("scheduler");
    let sample = Tensor::ones((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).expect("tensor");
    let mut noise = ReplayNoise::default();
    let sample = scheduler
        .step(&sample, 0, &sample, &mut noise)
        .expect("first step");
    let error = scheduler
        .step(&sample, 2, &sample, &mut noise)
        .expect_err("skipped a step");
    assert!(error.to_string().contains("expected step 1"), "{error}");
}
