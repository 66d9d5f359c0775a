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
{{- else if eq $svc.name "policy" }}
{{- if $svc.policiesConfigMap }}
- name: AIOS_POLICY_DIR
  value: /etc/aios/policies
{{- end }}
{{- if not (kindIs "invalid" $svc.auditFlushMs) }}
- name: AIOS_POLICY_AUDIT_FLUSH_MS
  value: {{ int $svc.auditFlushMs | quote }}
{{- end }}
{{- else if eq $svc.name "observability" }}
{{- if not (kindIs "invalid" $svc.auditRetentionDays) }}
- name: AIOS_OBSERVABILITY_AUDIT_RETENTION_DAYS
  value: {{ $svc.auditRetentionDays | toString | quote }}
{{- end }}
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
