//! Parity of the community samplers (DPM++ 2M SDE, DPM++ singlestep, UniPC, Heun, LMS, DDPM,
//! LCM) and of trailing spacing with diffusers 0.42.1, on the fixtures written by
//! `tests/fixtures/make_sampler_fixtures.py`: schedule tables (`samplers.json`) and whole
//! sampling runs on fixed model outputs with the noise diffusers drew (`sampler_steps.*`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ipcompose_schedulers::{build_scheduler, ReplayNoise, SchedulerConfig, SchedulerKind};
use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

/// Timesteps and sigmas: relative error. Measured worst 4.8e-7 (one-ulp differences of torch's
/// float32 `sqrt`, numpy's `log`/`pow`, as in reference.rs).
const TABLE_RELATIVE_TOLERANCE: f64 = 1e-5;

/// Largest |ours − diffusers| of a sample after a whole run (|x| up to ~30). Measured per case
/// in the test output; the worst is printed at the end.
const FINAL_ABSOLUTE_TOLERANCE: f32 = 1e-4;

fn fixture(relative: &str) -> PathBuf {
    let path = Path::new(FIXTURES).join(relative);
    assert!(
        path.exists(),
        "fixture {} is missing; run tests/fixtures/make_sampler_fixtures.py",
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

fn config_for(configs: &Value, case: &Value) -> SchedulerConfig {
    let base_name = case["base_config"].as_str().expect("base_config");
    let base =
        SchedulerConfig::from_json_str(&configs[base_name].to_string()).expect("base config");
    let overrides = case["overrides"].as_object().expect("overrides object");
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

/// Compares two tables; returns the worst relative error.
fn compare(what: &str, actual: &[f64], expected: &[f64]) -> f64 {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: length\n ours {actual:?}\n diffusers {expected:?}"
    );
    let mut worst = 0f64;
    for (index, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let error = (a - e).abs();
        let relative = if e == 0.0 { error } else { error / e.abs() };
        assert!(
            relative <= TABLE_RELATIVE_TOLERANCE,
            "{what}[{index}]: ours {a}, diffusers {e}\n ours {actual:?}\n diffusers {expected:?}"
        );
        worst = worst.max(relative);
    }
    worst
}

fn compare_tables(
    label: &str,
    scheduler: &dyn ipcompose_schedulers::Scheduler,
    case: &Value,
) -> f64 {
    let mut worst = compare(
        &format!("{label} timesteps"),
        scheduler.timesteps(),
        &floats(&case["timesteps"]),
    );
    match (&case["sigmas"], scheduler.sigmas()) {
        (Value::Null, None) => {}
        (expected, Some(actual)) if !expected.is_null() => {
            worst = worst.max(compare(
                &format!("{label} sigmas"),
                actual,
                &floats(expected),
            ));
        }
        (expected, actual) => {
            panic!("{label}: sigmas presence differs: ours {actual:?}, diffusers {expected}")
        }
    }
    let init = case["init_noise_sigma"].as_f64().expect("init_noise_sigma");
    worst.max(compare(
        &format!("{label} init_noise_sigma"),
        &[scheduler.init_noise_sigma()],
        &[init],
    ))
}

#[test]
fn sampler_tables_match_diffusers() {
    let reference = read_json("reference/samplers.json");
    let configs = &reference["configs"];
    let entries = reference["entries"].as_array().expect("entries");
    assert!(entries.len() >= 150, "only {} entries", entries.len());
    let mut worst = 0f64;
    let mut kinds = std::collections::BTreeSet::new();
    for case in entries {
        let label = format!(
            "{} {} {} steps {}",
            case["kind"], case["base_config"], case["overrides"], case["steps"]
        );
        let kind = kind_of(case);
        kinds.insert(kind.name());
        let config = config_for(configs, case);
        let steps = case["steps"].as_u64().expect("steps") as usize;
        let built = build_scheduler(kind, &config, steps);
        if let Some(error) = case.get("error") {
            // diffusers refused these settings; so must we.
            assert!(
                built.is_err(),
                "{label}: diffusers refused ({error}), we did not"
            );
            continue;
        }
        let scheduler = built.unwrap_or_else(|error| panic!("{label}: {error}"));
        worst = worst.max(compare_tables(&label, scheduler.as_ref(), case));
    }
    for kind in [
        "dpmpp-2m-sde",
        "dpmpp-2s",
        "unipc",
        "heun",
        "lms",
        "ddpm",
        "lcm",
    ] {
        assert!(kinds.contains(kind), "no table for {kind}");
    }
    eprintln!(
        "samplers.json: {} entries, worst relative error {worst:e}",
        entries.len()
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
fn sampler_runs_match_diffusers() {
    let cases = read_json("reference/sampler_steps.json");
    let cases = cases.as_array().expect("cases list");
    assert!(cases.len() >= 30, "only {} cases", cases.len());
    let configs = read_json("reference/samplers.json")["configs"].clone();
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixture("reference/sampler_steps.safetensors"),
        &Device::Cpu,
    )
    .expect("sampler_steps.safetensors");
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
        let config = config_for(&configs, case);
        let steps = case["steps"].as_u64().expect("steps") as usize;
        let mut scheduler = build_scheduler(kind_of(case), &config, steps)
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        compare_tables(name, scheduler.as_ref(), case);
        let calls = scheduler.timesteps().len();
        assert_eq!(
            calls as u64,
            case["model_calls"].as_u64().expect("calls"),
            "{name}"
        );

        let recorded: Vec<Tensor> = (0..)
            .map_while(|k| tensors.get(&format!("{name}.noise.{k}")).cloned())
            .collect();
        assert_eq!(
            recorded.len() as u64,
            case["num_noise"].as_u64().expect("num_noise"),
            "{name}"
        );
        let mut noise = ReplayNoise::new(recorded);
        let mut sample = initial
            .affine(scheduler.init_noise_sigma() as f32 as f64, 0.0)
            .expect("scaled sample");
        for index in 0..calls {
            let model_output = tensor(&format!("{name}.eps.{index}"));
            let unet_input = scheduler
                .scale_model_input(&sample, index)
                .expect("scale_model_input");
            assert_eq!(unet_input.dims(), sample.dims());
            sample = scheduler
                .step(&model_output, index, &sample, &mut noise)
                .unwrap_or_else(|error| panic!("{name} step {index}: {error}"));
        }
        assert_eq!(noise.remaining(), 0, "{name}: recorded noise left unused");
        let difference = max_abs_difference(&sample, &tensor(&format!("{name}.final")));
        eprintln!("{name}: final max |Δ| = {difference:e}");
        assert!(
            difference <= FINAL_ABSOLUTE_TOLERANCE,
            "{name}: final max |Δ| = {difference}"
        );
        worst_final = worst_final.max(difference);
    }
    eprintln!("sampler_steps: worst final max |Δ| = {worst_final:e}");
}

#[test]
fn heun_maps_evaluations_to_steps_and_keeps_order() {
    let config = SchedulerConfig::from_file(&fixture("tiny-sd15/scheduler/scheduler_config.json"))
        .expect("config");
    let mut scheduler = build_scheduler(SchedulerKind::Heun, &config, 3).expect("scheduler");
    assert_eq!(scheduler.timesteps().len(), 5);
    let steps: Vec<usize> = (0..5).map(|i| scheduler.inference_step(i)).collect();
    assert_eq!(steps, [0, 0, 1, 1, 2]);
    let sample = Tensor::ones((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).expect("ones");
    let mut noise = ReplayNoise::default();
    let sample = scheduler
        .step(&sample, 0, &sample, &mut noise)
        .expect("first evaluation");
    let error = scheduler
        .step(&sample, 2, &sample, &mut noise)
        .expect_err("skipped the correction");
    assert!(error.to_string().contains("expected step 1"), "{error}");
}

#[test]
fn settings_other_classes_own_are_refused() {
    let config = SchedulerConfig::from_file(&fixture("tiny-sd15/scheduler/scheduler_config.json"))
        .expect("config");
    let refused = |key: &str, value: Value, kind: SchedulerKind| {
        let config = config
            .clone()
            .with_override(key, value)
            .unwrap_or_else(|error| panic!("{key}: {error}"));
        build_scheduler(kind, &config, 4)
            .map(|_| ())
            .expect_err(key)
            .to_string()
    };
    // LCM and DPM singlestep have no spacing setting.
    let message = refused("timestep_spacing", "trailing".into(), SchedulerKind::Lcm);
    assert!(message.contains("no effect on the lcm"), "{message}");
    let message = refused(
        "timestep_spacing",
        "trailing".into(),
        SchedulerKind::DpmPp2s,
    );
    assert!(message.contains("dpmpp-2s"), "{message}");
    // UniPC's B(h) names are not DPM-Solver's.
    let message = refused("solver_type", "bh1".into(), SchedulerKind::DpmPp2m);
    assert!(message.contains("midpoint, heun"), "{message}");
    let message = refused("solver_order", 3.into(), SchedulerKind::DpmPp2mSde);
    assert!(message.contains("1, 2"), "{message}");
    // diffusers gives NaN for UniPC bh1 with a zero final sigma.
    let message = refused("solver_type", "bh1".into(), SchedulerKind::UniPc);
    assert!(message.contains("final_sigmas_type"), "{message}");
    let message = refused(
        "variance_type",
        "fixed_small".into(),
        SchedulerKind::DpmPp2m,
    );
    assert!(message.contains("ddpm"), "{message}");
    // A UniPC file's solver type read by DPM-Solver is mapped as diffusers does.
    let unipc_file = SchedulerConfig::from_json_str(r#"{"solver_type": "bh2"}"#).expect("json");
    assert!(build_scheduler(SchedulerKind::DpmPp2m, &unipc_file, 4).is_ok());
}
