# hma-gym: `make demo` and `make test` set everything up on a fresh machine (Debian + Python 3.11).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-stamp
SUDO := $(shell [ "$$(id -u)" = "0" ] || echo sudo)
# Mesa EGL for offscreen MuJoCo rendering (no GPU, no display)
APT_PACKAGES := libegl1 libegl-mesa0 libgl1-mesa-dri libgl1 libglx-mesa0 chromium chromium-driver g++
export MUJOCO_GL ?= egl

.PHONY: setup demo test lint bench interaction-data state-model lift-data lift-checkpoint dp-lift lift-mar lift-mar-warm lift-mar-ft lift-fast tokenizer-15k mix-data tokens-15k lift-15k-pack lift-15k-cpu mixture-data mixture-tasks pretraining-study pretraining-study-tasks clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing; fi
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the CPU build on this machine's disk (an unpinned torch pulls a CUDA build)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q "mujoco==3.3.7" "robosuite==1.5.2"
	# robomimic 0.3.0 pins mujoco_py/torchvision-era deps: install it alone, use only its dataset utils
	$(PIP) install -q --no-deps "robomimic==0.3.0"
	$(PIP) install -q -e ".[dev,robomimic]"
	$(PY) -c "import torch, robosuite, robomimic, hma_gym; print('setup ok: torch', torch.__version__)"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/hma-gym demo

test: setup
	$(PY) -m pytest -q

# the edit-test loop: the suite without the tests marked slow (tiny pipeline, long rollouts, browser, CLI and
# training runs); `make test` (CI) runs them all
.PHONY: test-fast
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check hma_gym training policies benchmarks tests

bench: setup
	$(PY) -m benchmarks.env_speed

# robomimic's own training on this project's files: the [robomimic] extra (robomimic 0.3.0 itself comes with
# setup, without its dependencies), then robomimic's BC trainer for a few steps on a collected and a synthetic file.
.PHONY: robomimic
robomimic: setup
	$(PIP) install -q -e ".[robomimic]"
	$(PY) -m pytest -q tests/test_robomimic.py

# The recipe of the shipped Lift checkpoint (hma_gym/assets/lift). Order: `make lift-data`, `make dp-lift`
# (its DP checkpoints are the imperfect policies whose GT rollouts join the world model's data), then
# `make lift-checkpoint`. The dynamics model was trained on one lent H100 (scripts/gpu_lift.sh, ~9 min);
# run the target on a machine with a CUDA GPU (the script trains with --device cuda --bf16).
HMA := $(VENV)/bin/hma-gym
# the masking-objective mixture of every shipped world model (HMAConfig's default: 0.7 / 0.1 / 0.1 / 0.1); a run
# started with --init keeps its init model's
SHIPPED_OBJECTIVES := '{"forward": 0.8, "full": 0.1, "passive": 0.05, "policy": 0.05}'
lift-data: setup
	$(HMA) collect --task lift --episodes 200 --seed 0 --out data/lift.hdf5
	$(HMA) train-tokenizer --data data/lift.hdf5 --out runs/tokenizer --steps 3000 --batch-size 16 \
	  --temporal-weight 0.05 --weight-decay 0 --min-lr-ratio 0.05 --warmup 50 --threads 1

lift-checkpoint: setup
	for it in 300 1200 3000 5000; do $(HMA) collect --policy runs/dp_lift/iter_$$it --episodes 25 --seed 30000 \
	  --out data/dp_a.hdf5 || exit 1; done
	for it in 800 2000 4000 6000; do $(HMA) collect --policy runs/dp_lift/iter_$$it --episodes 25 --seed 40000 \
	  --out data/dp_b.hdf5 || exit 1; done
	$(HMA) tokenize --data data/lift.hdf5 --extra-data data/dp_a.hdf5 data/dp_b.hdf5 --tokenizer runs/tokenizer \
	  --max-valid-episodes 10 --out data/lift_dp_tokens.safetensors
	PYTHON=$(PY) bash scripts/gpu_lift.sh outputs/gpu
	$(HMA) train-detector --data data/lift.hdf5 --out runs/detector --threads 1
	rm -rf hma_gym/assets/lift
	$(HMA) pack --out hma_gym/assets/lift --tokenizer runs/tokenizer --dynamics runs/gpu/dp \
	  --detector runs/detector --data data/lift.hdf5 --bank-size 180
	$(HMA) calibrate-success --checkpoint hma_gym/assets/lift --data data/lift.hdf5 \
	  --extra-data data/dp_a.hdf5 data/dp_b.hdf5 --repeats 2 --write --out benchmarks/results/calibrate_success_lift.json
	$(HMA) eval-model --data data/lift.hdf5 --stride 16 --random-actions 2 \
	  --out benchmarks/results/eval_model_lift.json

# The recipe of the shipped Diffusion Policy (policies/assets/dp_lift), on the successful training demos,
# as it was run: 2000 steps (cosine schedule over 2000), then resumed under an 8000-step schedule; the
# iteration-6000 checkpoint is shipped and the saved iterations are the correlation study's policies
# (about 2 h on one core of this CPU).
dp-lift: setup
	$(HMA) train-policy --data data/lift.hdf5 --filter-key train_success --valid-key valid_success \
	  --out runs/dp_lift --steps 2000 --save-at 100 200 300 500 800 1200 --threads 1
	mkdir -p runs/dp_lift/iter_2000 && cp runs/dp_lift/policy.json runs/dp_lift/policy.safetensors runs/dp_lift/iter_2000/
	$(HMA) train-policy --data data/lift.hdf5 --filter-key train_success --valid-key valid_success \
	  --out runs/dp_lift --steps 8000 --save-at 3000 4000 5000 6000 7000 --threads 1
	rm -rf policies/assets/dp_lift && mkdir -p policies/assets/dp_lift
	cp runs/dp_lift/iter_6000/policy.json runs/dp_lift/iter_6000/policy.safetensors policies/assets/dp_lift/

# The shipped fast variant (hma_gym/assets/lift_fast, `variant="fast"`): blocks 0 and 3 of the shipped MaskGIT
# model (hma-gym select-layers), fine-tuned on this CPU in two stages (about an hour each at 2 threads) on Lift
# plus GT rollouts of the shipped DP and noisier expert episodes. Needs data/lift.hdf5 (make lift-data) and the
# shipped checkpoint.
FAST_TRAIN = $(HMA) train --tokens data/lift_mix_tokens.safetensors --data data/lift.hdf5 \
  --extra-data data/dp_shipped.hdf5 data/lift_noisy.hdf5 --tokenizer hma_gym/assets/lift --batch-size 32 \
  --save-every 50 --log-every 10 --prompt-frames 1 --threads 2
# The data mix of the fast variant and of the 15k-tokenizer runs: Lift + GT rollouts of the shipped DP + noisier
# expert episodes (each collected only when its file is missing)
data/lift.hdf5: | setup
	$(HMA) collect --task lift --episodes 200 --seed 0 --out data/lift.hdf5

mix-data: setup data/lift.hdf5
	[ -f data/dp_shipped.hdf5 ] || $(HMA) collect --policy dp-lift --episodes 100 --seed 30000 --out data/dp_shipped.hdf5
	[ -f data/lift_noisy.hdf5 ] || $(HMA) collect --episodes 100 --seed 50000 --action-noise 0.15 \
	  --failure-probs '{"missed_grasp": 0.25, "early_release": 0.25, "hesitation": 0.3}' --out data/lift_noisy.hdf5

lift-fast: mix-data
	$(HMA) tokenize --data data/lift.hdf5 --extra-data data/dp_shipped.hdf5 data/lift_noisy.hdf5 \
	  --tokenizer hma_gym/assets/lift --max-valid-episodes 10 --out data/lift_mix_tokens.safetensors
	$(HMA) select-layers --source hma_gym/assets/lift --layers 0 3 --out runs/fast1
	$(FAST_TRAIN) --init runs/fast1 --out runs/fast2 --steps 650 --lr 5e-4 \
	  --warmup 30 --min-lr-ratio 0.1 --eval-every 200
	# stage 2: a warm restart from stage 1 at a lower rate, another hour (+0.24 dB sampled in eval-model)
	$(FAST_TRAIN) --init runs/fast2 --out runs/fast3 --steps 700 --lr 3e-4 --warmup 20 --min-lr-ratio 0.05 \
	  --eval-every 350 --seed 1
	rm -rf hma_gym/assets/lift_fast
	$(HMA) pack --out hma_gym/assets/lift_fast --tokenizer hma_gym/assets/lift --dynamics runs/fast3 \
	  --detector hma_gym/assets/lift --data data/lift.hdf5 --bank-size 180 --success-rule-from hma_gym/assets/lift \
	  --recipe "docs/checkpoints.md, fast: make lift-fast"
	$(HMA) eval-model --checkpoint hma_gym/assets/lift_fast --data data/lift.hdf5 --stride 16 --random-actions 2 \
	  --out benchmarks/results/eval_model_lift_fast.json
	$(HMA) eval-model --checkpoint hma_gym/assets/lift_fast --data data/lift.hdf5 --stride 16 --random-actions 2 \
	  --greedy --out benchmarks/results/eval_model_lift_fast_greedy.json

# Issue 25's interaction data: what policies do, not only what experts do (3,500 GT episodes, ~2 h 15 min on one
# core; each file is collected only when missing, and a killed collection resumes where it stopped). Every file
# records robomimic's `object` key. Seeds 100000-160999: disjoint from every evaluation seed (10000+, 20000+, 900000+).
MIX_DIR ?= data/mix
MIX_SEVERITY := '{"missed_grasp": [0, 0.06], "close_early": [0.02, 0.065], "close_late": [0, 0.05], \
  "release_mid_lift": [0, 0.04], "push": [0, 0.06]}'
MIX_FAILURES := '{"missed_grasp": 0.2, "close_early": 0.08, "close_late": 0.1, "release_mid_lift": 0.08, \
  "push": 0.06, "never_close": 0.06, "early_release": 0.06, "hesitation": 0.08}'
interaction-data: setup
	mkdir -p $(MIX_DIR)
	$(HMA) collect --total 1000 --seed 100000 --action-noise 0.05 --failure-probs $(MIX_FAILURES) \
	  --severity $(MIX_SEVERITY) --out $(MIX_DIR)/expert_failures.hdf5
	$(HMA) collect --total 300 --seed 110000 --action-noise 0.3 --failure-probs $(MIX_FAILURES) \
	  --severity $(MIX_SEVERITY) --out $(MIX_DIR)/noisy_expert.hdf5
	$(HMA) collect --policy random --total 200 --seed 120000 --out $(MIX_DIR)/random.hdf5
	$(HMA) collect --policy random-smooth --total 300 --seed 130000 --out $(MIX_DIR)/random_smooth.hdf5
	$(HMA) collect --policy dp-lift --total 200 --seed 140000 --out $(MIX_DIR)/dp_shipped.hdf5
	$(HMA) collect --total 500 --seed 150000 --action-noise 0.05 --failure-probs '{"missed_grasp": 1.0}' \
	  --severity '{"missed_grasp": [0.01, 0.05]}' --out $(MIX_DIR)/near_miss.hdf5
	$(HMA) collect --total 1000 --seed 160000 --action-noise 0.05 --failure-probs '{"missed_grasp": 1.0}' \
	  --severity '{"missed_grasp": [0.015, 0.07]}' --out $(MIX_DIR)/near_miss_wide.hdf5

# The shipped state model (proprio + object-state dynamics; its verdicts are the learned env's), trained on the
# interaction data and put into every shipped checkpoint, whose reset banks come from data/lift.hdf5 (make
# lift-data). ~8 min on one thread (4,000 steps of 256 windows of 16 steps).
STATE_DATA := $(MIX_DIR)/expert_failures.hdf5 $(MIX_DIR)/near_miss.hdf5 $(MIX_DIR)/near_miss_wide.hdf5 \
  $(MIX_DIR)/random.hdf5 $(MIX_DIR)/random_smooth.hdf5 $(MIX_DIR)/noisy_expert.hdf5 data/lift.hdf5 \
  $(MIX_DIR)/dp_shipped.hdf5
state-model: setup
	$(HMA) train-state --data $(STATE_DATA) --out runs/state_model --threads 1 --no-progress \
	  --into hma_gym/assets/lift hma_gym/assets/lift_fast hma_gym/assets/lift_mar hma_gym/assets/lift_15k \
	  --bank-data data/lift.hdf5
	# each checkpoint's uncertainty limit: what 95% of 80 held-out episodes never pass (~1.5 min each)
	for v in lift lift_fast lift_mar lift_15k; do \
	  $(HMA) calibrate-success --checkpoint hma_gym/assets/$$v --data data/lift.hdf5 \
	    --extra-data $(MIX_DIR)/expert_failures.hdf5 $(MIX_DIR)/dp_shipped.hdf5 --max-demos 40 --write --no-progress \
	    --out benchmarks/results/uncertainty_limit_$$v.json; done

# The 15,360-code FSQ tokenizer (hma_gym/assets/tokenizer_15k; ~40 min on this CPU), scored beside the shipped
# checkpoints' one on every held-out frame. No shipped world model uses it yet: its codes need a new dynamics model.
tokenizer-15k: setup data/lift.hdf5
	$(HMA) train-tokenizer --data data/lift.hdf5 --out runs/tok_fsq15k --preset base --levels 8 8 8 6 5 \
	  --steps 5500 --batch-size 32 --weight-decay 0 --min-lr-ratio 0.05 --warmup 100 --eval-every 500 \
	  --save-every 500 --log-every 50 --threads 2
	rm -rf hma_gym/assets/tokenizer_15k && mkdir -p hma_gym/assets/tokenizer_15k
	cp runs/tok_fsq15k/tokenizer.safetensors runs/tok_fsq15k/tokenizer.json hma_gym/assets/tokenizer_15k/
	$(PY) -m benchmarks.tokenizer_psnr --data data/lift.hdf5 --tokenizers hma_gym/assets/lift hma_gym/assets/tokenizer_15k \
	  --threads 2

# Issue 3's next step, for a session with a lent GPU: the token cache of the mix under the 15k tokenizer (~1 min,
# 23 MB: carry it), then on the GPU `bash scripts/gpu_lift_15k.sh $$OUT` (two runs, ~7 min), then here
# `python scripts/unpack_runs.py OUT runs/gpu15k` and `make lift-15k-pack RUN=runs/gpu15k/d160` (pack + eval-model)
tokens-15k: mix-data
	$(HMA) tokenize --data data/lift.hdf5 --extra-data data/dp_shipped.hdf5 data/lift_noisy.hdf5 \
	  --tokenizer hma_gym/assets/tokenizer_15k --max-valid-episodes 10 --out data/lift_mix_tokens_15k.safetensors

# The same on this CPU, made cheap by the factorised head (--factorized-head: one softmax per FSQ channel, 35 logits a
# token instead of 15,360; 2.9 M parameters) and started from the shipped checkpoint's trunk (--init-mode trunk):
# 1000 steps of 32 windows (~1.7 h on 2 cores), two warm restarts at lower rates (350 steps, ~40 min; 900 steps,
# ~1.7 h), then packed and evaluated as above (results copied to benchmarks/results/eval_model_lift_15k*.json) and
# shipped as hma_gym/assets/lift_15k (variant="fsq15k")
F15K_TRAIN = $(HMA) train --tokens data/lift_mix_tokens_15k.safetensors --data data/lift.hdf5 \
  --extra-data data/dp_shipped.hdf5 data/lift_noisy.hdf5 --tokenizer hma_gym/assets/tokenizer_15k --batch-size 32 \
  --prompt-frames 1 --eval-windows 24 --save-every 50 --log-every 10 --threads 2
lift-15k-cpu: tokens-15k
	$(F15K_TRAIN) --factorized-head --init hma_gym/assets/lift --init-mode trunk --steps 1000 --lr 7e-4 \
	  --warmup 40 --min-lr-ratio 0.1 --eval-every 250 --out runs/f15k
	$(F15K_TRAIN) --init runs/f15k --steps 350 --lr 3e-4 --warmup 20 --min-lr-ratio 0.05 --eval-every 350 --seed 1 \
	  --out runs/f15k2
	$(F15K_TRAIN) --init runs/f15k2 --steps 900 --lr 4e-4 --warmup 30 --min-lr-ratio 0.05 --eval-every 300 --seed 2 \
	  --out runs/f15k3
	$(MAKE) lift-15k-pack RUN=runs/f15k3 RECIPE="make lift-15k-cpu"
	cp outputs/eval_model_lift_15k.json outputs/eval_model_lift_15k_greedy.json benchmarks/results/
	rm -rf hma_gym/assets/lift_15k && cp -r runs/lift_15k hma_gym/assets/lift_15k

RUN ?= runs/gpu15k/d160
RECIPE ?= make tokens-15k, scripts/gpu_lift_15k.sh, make lift-15k-pack RUN=$(RUN)
lift-15k-pack: setup
	rm -rf runs/lift_15k
	$(HMA) pack --out runs/lift_15k --tokenizer hma_gym/assets/tokenizer_15k --dynamics $(RUN) \
	  --detector hma_gym/assets/lift --data data/lift.hdf5 --bank-size 180 --success-rule-from hma_gym/assets/lift \
	  --recipe "docs/checkpoints.md: $(RECIPE)"
	$(HMA) eval-model --checkpoint runs/lift_15k --data data/lift.hdf5 --stride 16 --random-actions 2 \
	  --out outputs/eval_model_lift_15k.json
	$(HMA) eval-model --checkpoint runs/lift_15k --data data/lift.hdf5 --stride 16 --random-actions 2 --greedy \
	  --out outputs/eval_model_lift_15k_greedy.json

# The continuous (MAR) variant, trained as the CPU MaskGIT comparison run was (runs/dynamics: same data, size,
# schedule and evaluation windows); its periodic held-out evaluations are the matched-budget comparison.
lift-mar: setup
	$(HMA) train --data data/lift.hdf5 --tokenizer runs/tokenizer --out runs/mar --head mar --diff-batch-mul 2 \
	  --steps 1600 --batch-size 8 --lr 0.0015 --min-lr-ratio 0.1 --warmup 100 --weight-decay 0.05 --eval-every 400 \
	  --save-every 100 --preset small --d-model 160 --n-layer 4 --n-head 4 --patch-size 2 --prompt-frames 1 \
	  --objective-probs $(SHIPPED_OBJECTIVES) --eval-windows 24 --threads 1

# The shipped MAR checkpoint (hma_gym/assets/lift_mar): a MAR model started from the shipped MaskGIT run
# (runs/gpu/dp, `make lift-checkpoint`), its trunk frozen, the diffusion head trained on this CPU (~60 min)
lift-mar-warm: setup
	$(HMA) train --data data/lift.hdf5 --extra-data data/dp_a.hdf5 data/dp_b.hdf5 --tokenizer runs/tokenizer \
	  --out runs/mar_warm --head mar --lattice-input --init runs/gpu/dp --init-mode trunk \
	  --trainable diffusion-head --steps 1200 --batch-size 16 --lr 1e-3 --warmup 50 --min-lr-ratio 0.1 --diff-batch-mul 2 --eval-every 400 \
	  --save-every 50 --log-every 10 --eval-windows 24 --prompt-frames 1 --threads 2
	rm -rf hma_gym/assets/lift_mar
	$(HMA) pack --out hma_gym/assets/lift_mar --tokenizer runs/tokenizer --dynamics runs/mar_warm \
	  --detector runs/detector --data data/lift.hdf5 --bank-size 180 --success-rule-from hma_gym/assets/lift \
	  --recipe "docs/checkpoints.md, mar: make lift-mar-warm"
	$(HMA) eval-model --checkpoint hma_gym/assets/lift_mar --data data/lift.hdf5 --stride 16 --random-actions 2 \
	  --out outputs/eval_model_lift_mar_warm.json

# Stage 2 of the shipped MAR checkpoint, after `make lift-mar-warm`: the whole model (trunk unfrozen) fine-tuned
# from that checkpoint on Lift on this CPU (~60 min), packed with noise-free DDIM as its default decoding
lift-mar-ft: setup
	$(HMA) train --data data/lift.hdf5 --tokenizer hma_gym/assets/lift_mar --out runs/mar_ft --head mar \
	  --init hma_gym/assets/lift_mar --steps 900 --batch-size 16 --lr 3e-4 --warmup 50 --min-lr-ratio 0.1 \
	  --diff-batch-mul 2 --eval-every 300 --save-every 50 --log-every 10 --eval-windows 24 --prompt-frames 1 --threads 2
	$(HMA) pack --out runs/lift_mar_ft --tokenizer hma_gym/assets/lift --dynamics runs/mar_ft \
	  --detector hma_gym/assets/lift --data data/lift.hdf5 --bank-size 180 --success-rule-from hma_gym/assets/lift \
	  --greedy --recipe "docs/checkpoints.md, mar: make lift-mar-warm, then make lift-mar-ft"
	rm -rf hma_gym/assets/lift_mar && mv runs/lift_mar_ft hma_gym/assets/lift_mar
	$(HMA) eval-model --checkpoint hma_gym/assets/lift_mar --data data/lift.hdf5 --stride 16 --random-actions 2 \
	  --greedy --out benchmarks/results/eval_model_lift_mar.json
	$(HMA) eval-model --checkpoint hma_gym/assets/lift_mar --data data/lift.hdf5 --stride 16 --random-actions 2 \
	  --out benchmarks/results/eval_model_lift_mar_sample.json

# Heterogeneous pre-training study (issue 8): 4 other embodiments (2 action spaces, 2 control rates), then
# scratch vs pre-trained + fine-tuned on 50 Lift-Panda demos (needs data/lift.hdf5 and runs/tokenizer)
mixture-data: setup
	$(HMA) collect --no-progress --robot Sawyer --controller OSC_POSE --episodes 80 --seed 60000 --out data/mixture/sawyer_osc_pose.hdf5
	$(HMA) collect --no-progress --robot IIWA --controller OSC_POSITION --episodes 40 --seed 61000 --out data/mixture/iiwa_osc_position.hdf5
	$(HMA) collect --no-progress --robot UR5e --controller OSC_POSE --episodes 60 --seed 62000 --out data/mixture/ur5e_osc_pose.hdf5
	$(HMA) collect --no-progress --robot Kinova3 --controller OSC_POSE --control-freq 40 --max-steps 200 \
	  --steps-after-success 20 --episodes 30 --seed 63000 --out data/mixture/kinova3_osc_pose_40hz.hdf5

# a second task on two of those arms (benchmarks/pretraining_mixture_tasks.json, make pretraining-study-tasks)
# and a tokenizer trained on every arm (the Lift tokenizer saw only the Panda)
mixture-tasks: mixture-data
	$(HMA) collect --no-progress --task stack --robot Sawyer --episodes 40 --seed 64000 --out data/mixture/sawyer_osc_pose_stack.hdf5
	$(HMA) collect --no-progress --task stack --robot UR5e --episodes 40 --seed 65000 --out data/mixture/ur5e_osc_pose_stack.hdf5
	$(HMA) train-tokenizer --data data/lift.hdf5 --extra-data data/mixture/sawyer_osc_pose.hdf5 \
	  data/mixture/iiwa_osc_position.hdf5 data/mixture/ur5e_osc_pose.hdf5 data/mixture/kinova3_osc_pose_40hz.hdf5 \
	  --out runs/tokenizer_mixture --steps 3000 --batch-size 16 --temporal-weight 0.05 --weight-decay 0 \
	  --min-lr-ratio 0.05 --warmup 50 --threads 1

pretraining-study: setup
	$(PY) -m benchmarks.pretraining --mixture benchmarks/pretraining_mixture.json --lift data/lift.hdf5 \
	  --tokenizer runs/tokenizer --pretrain-steps 1000 --finetune-steps 400 --new-stem-steps 50 --train-seeds 0 1 --jobs 2

# the same study with two tasks (Lift + Stack) in the mixture and the tokenizer trained on every arm
pretraining-study-tasks: setup
	$(PY) -m benchmarks.pretraining --mixture benchmarks/pretraining_mixture_tasks.json --lift data/lift.hdf5 \
	  --tokenizer runs/tokenizer_mixture --pretrain-steps 1000 --finetune-steps 400 --new-stem-steps 50 \
	  --train-seeds 0 1 --jobs 2 --work runs/pretraining_tasks --name pretraining_tasks

clean-venv:
	rm -rf $(VENV)
