{{/*
The environment of one service's container: (list $ $svc). Shared settings
come from the ConfigMap (envFrom); this adds what is the service's own. Every
AIOS_* name here is a field of the service's settings class
(tests/chart/test_settings_env.py loads the rendered env through it).
*/}}
{{- define "aios.listenAddr" -}}
{{- $host := index . 0 -}}
{{- $port := index . 1 -}}
{{- if contains ":" $host -}}
{{- printf "[%s]:%d" $host (int $port) -}}
{{- else -}}
{{- printf "%s:%d" $host (int $port) -}}
{{- end -}}
{{- end -}}

{{- define "aios.serviceEnv" -}}
{{- $root := index . 0 -}}
{{- $svc := index . 1 -}}
{{- $NAME := upper $svc.name -}}
- name: AIOS_GRPC_LISTEN_ADDR
  value: {{ include "aios.listenAddr" (list $root.Values.config.listenHost $svc.grpcPort) | quote }}
- name: AIOS_{{ $NAME }}_METRICS_PORT
  value: {{ int $svc.metricsPort | quote }}
- name: AIOS_GRPC_MAX_MESSAGE_BYTES
  value: {{ int64 $svc.grpc.maxMessageBytes | quote }}
- name: AIOS_GRPC_MAX_CONCURRENT_CALLS
  value: {{ int64 $svc.grpc.maxConcurrentCalls | quote }}
- name: AIOS_GRPC_WORKERS
  value: {{ int64 $svc.grpc.workers | quote }}
- name: AIOS_STANDBY_LEASE_MS
  value: {{ int64 $svc.standbyLeaseMs | quote }}
{{- if eq $svc.kind "StatefulSet" }}
# The pod name (planner-0, planner-1, ...) survives restarts and rollouts:
# the consumer's static group member id (group.instance.id = group-pod).
- name: AIOS_INSTANCE_ID
  valueFrom:
    fieldRef: {fieldPath: metadata.name}
{{- end }}
{{- if has $svc.name (list "planner" "memory") }}
- name: AIOS_DEFAULT_TENANT
  value: {{ $root.Values.config.defaultTenant | quote }}
{{- end }}
{{- if eq $svc.name "planner" }}
{{- if not (kindIs "invalid" $svc.batchSize) }}
- name: AIOS_PLANNER_BATCH_SIZE
  value: {{ int $svc.batchSize | quote }}
{{- end }}
{{- if not (kindIs "invalid" $svc.timerIntervalMs) }}
- name: AIOS_PLANNER_TIMER_INTERVAL_MS
  value: {{ int $svc.timerIntervalMs | quote }}
{{- end }}
{{- if $svc.workflowsConfigMap }}
- name: AIOS_PLANNER_WORKFLOW_DIR
  value: /etc/aios/workflows
{{- end }}
- name: AIOS_PLANNER_MAX_IN_FLIGHT_PER_TENANT
  value: {{ int64 $svc.maxInFlightPerTenant | quote }}
- name: AIOS_PLANNER_MAX_IN_FLIGHT_PER_WORKFLOW
  value: {{ int64 $svc.maxInFlightPerWorkflow | quote }}
- name: AIOS_PLANNER_CLASSIFY_IN_BACKGROUND
  value: {{ $svc.classifyInBackground | toString | quote }}
- name: AIOS_PLANNER_RETENTION_S
  value: {{ int64 $svc.retentionSeconds | quote }}
{{- else if eq $svc.name "executor" }}
{{- if not (kindIs "invalid" $svc.workers) }}
- name: AIOS_EXECUTOR_WORKERS
  value: {{ int $svc.workers | quote }}
{{- end }}
{{- if not (kindIs "invalid" $svc.batchSize) }}
- name: AIOS_EXECUTOR_BATCH_SIZE
  value: {{ int $svc.batchSize | quote }}
{{- end }}
{{- if $svc.plugins }}
- name: AIOS_EXECUTOR_PLUGINS
  value: {{ $svc.plugins | quote }}
{{- end }}
- name: AIOS_EXECUTOR_RECORD_TTL_S
  value: {{ int64 $svc.recordTtlSeconds | quote }}
- name: AIOS_EXECUTOR_LEASE_TTL_S
  value: {{ $svc.leaseTtlSeconds | toString | quote }}
- name: AIOS_EXECUTOR_CLAIM_THRESHOLD_BYTES
  value: {{ int64 $svc.claimThresholdBytes | quote }}
- name: AIOS_EXECUTOR_MAX_RESPONSE_BYTES
  value: {{ int64 $svc.maxResponseBytes | quote }}
{{- with $svc.tenantRateLimit }}
- name: AIOS_EXECUTOR_TENANT_RATE_PER_S
  value: {{ .perSecond | toString | quote }}
- name: AIOS_EXECUTOR_TENANT_BURST
  value: {{ int64 .burst | quote }}
- name: AIOS_EXECUTOR_TENANT_MAX_WAIT_MS
  value: {{ int64 .maxWaitMs | quote }}
- name: AIOS_EXECUTOR_TENANT_RATES
  value: {{ toJson .tenants | quote }}
{{- end }}
{{- range $var, $url := $svc.connectors }}
- name: {{ $var }}
  value: {{ $url | quote }}
{{- end }}
{{- if $svc.generator.url }}
- name: AIOS_EXECUTOR_GENERATOR_URL
  value: {{ $svc.generator.url | quote }}
- name: AIOS_EXECUTOR_GENERATOR_MODEL
  value: {{ $svc.generator.model | quote }}
{{- end }}
{{- if $svc.generator.existingSecret }}
- name: AIOS_EXECUTOR_GENERATOR_API_KEY
  valueFrom:
    secretKeyRef: {name: {{ $svc.generator.existingSecret | quote }}, key: {{ $svc.generator.apiKeyKey | quote }}}
{{- end }}
{{- else if eq $svc.name "memory" }}
{{- if not (kindIs "invalid" $svc.seedFile) }}
- name: AIOS_MEMORY_SEED_FILE
  value: {{ $svc.seedFile | quote }}
{{- end }}
{{- if $svc.seedTenant }}
- name: AIOS_MEMORY_SEED_TENANT
  value: {{ $svc.seedTenant | quote }}
{{- end }}
{{- if not (kindIs "invalid" $svc.workingTtlSeconds) }}
- name: AIOS_MEMORY_WORKING_TTL_S
  value: {{ int $svc.workingTtlSeconds | quote }}
{{- end }}
{{- if not (kindIs "invalid" $svc.episodeRetention) }}
- name: AIOS_MEMORY_EPISODE_RETENTION
  value: {{ int $svc.episodeRetention | quote }}
{{- end }}
- name: AIOS_MEMORY_EMBED_TIMEOUT_S
  value: {{ $svc.embedTimeoutSeconds | toString | quote }}
- name: AIOS_MEMORY_EMBED_REQUESTS_IN_FLIGHT
  value: {{ int64 $svc.embedRequestsInFlight | quote }}
{{- else if eq $svc.name "policy" }}
{{- if $svc.policiesConfigMap }}
- name: AIOS_POLICY_DIR
  value: /etc/aios/policies
{{- end }}
{{- if not (kindIs "invalid" $svc.auditFlushMs) }}
- name: AIOS_POLICY_AUDIT_FLUSH_MS
  value: {{ int $svc.auditFlushMs | quote }}
{{- end }}
- name: AIOS_POLICY_RESERVATION_TTL_S
  value: {{ int64 $svc.reservationTtlSeconds | quote }}
{{- else if eq $svc.name "observability" }}
{{- if not (kindIs "invalid" $svc.auditRetentionDays) }}
- name: AIOS_OBSERVABILITY_AUDIT_RETENTION_DAYS
  value: {{ $svc.auditRetentionDays | toString | quote }}
{{- end }}
- name: AIOS_OBSERVABILITY_RUN_META_TTL_S
  value: {{ int64 $svc.runMetaTtlSeconds | quote }}
- name: AIOS_OBSERVABILITY_DRIFT_WINDOW_RECORDS
  value: {{ int64 $svc.drift.windowRecords | quote }}
- name: AIOS_OBSERVABILITY_DRIFT_STEP_RECORDS
  value: {{ int64 $svc.drift.stepRecords | quote }}
- name: AIOS_OBSERVABILITY_DRIFT_BASELINE_WINDOWS
  value: {{ int64 $svc.drift.baselineWindows | quote }}
{{- end }}
{{- include "aios.secretEnv" $root }}
{{- range $var, $value := $svc.env }}
- name: {{ $var }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- with $svc.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}
