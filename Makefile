# Every target sets itself up: a fresh clone needs only python3 (3.11+) and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAGE  ?= dev

.PHONY: setup run simulate test bench fuzz soak package deploy destroy rotate-key retire-keys clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

run: setup           ## the whole pipeline locally: embedded SQS, API, consumer
	$(PY) -m tools.local_run --stage $(STAGE)

simulate: setup      ## a flespi stream against make run (or URL=...)
	$(PY) -m tools.simulate $(ARGS)

test: setup          ## the whole suite; no AWS account, loopback only
	$(PY) -m pytest

bench: setup         ## throughput vs the naive Lambda, same run
	$(PY) -m tools.bench $(ARGS)

fuzz: setup          ## the long fuzzing run (make test runs a short one)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -m fuzz -p no:cacheprovider

soak: setup          ## several flespi streams against make run, faults on
	$(PY) -m tools.soak $(ARGS)

package: setup       ## dist/$(STAGE)/: one CloudFormation template
	$(PY) -m tools.deploy package --stage $(STAGE)

deploy: setup        ## real AWS: queues, app, API key, usage plan
	$(PY) -m tools.deploy deploy --stage $(STAGE)

destroy: setup       ## real AWS: remove what deploy made (DELETE_QUEUES=1 for queues)
	$(PY) -m tools.deploy destroy --stage $(STAGE) $(if $(DELETE_QUEUES),--delete-queues)

rotate-key: setup    ## real AWS: add a new API key (the old one keeps working)
	$(PY) -m tools.deploy rotate-key --stage $(STAGE)

retire-keys: setup   ## real AWS: delete API keys older than the newest
	$(PY) -m tools.deploy retire-keys --stage $(STAGE)

clean:
	rm -rf $(VENV) dist .pytest_cache .hypothesis
