{{/*
Names, labels and the shared pieces of every pod. Every object name and label
comes from here.
*/}}

{{- define "aios.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "aios.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "aios.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "aios.labels" -}}
helm.sh/chart: {{ include "aios.chart" . }}
{{ include "aios.releaseSelector" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: aios-mesh
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Every pod of this release (the mesh's own peers in NetworkPolicies). */}}
{{- define "aios.releaseSelector" -}}
app.kubernetes.io/name: {{ include "aios.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of one component: (list $ "planner"). */}}
{{- define "aios.selectorLabels" -}}
{{ include "aios.releaseSelector" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* Labels of one component's objects: (list $ "planner"). */}}
{{- define "aios.componentLabels" -}}
{{ include "aios.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/*
What the code fixes about each service (services/<name>/main.py): the consumer
group it joins (`rt.consume(group, roles)`; the group id is topic prefix +
group) and the catalog roles it consumes. tests/chart/test_wiring.py reads the
code and fails when these drift.
*/}}
{{- define "aios.serviceFacts" -}}
planner:
  group: planner
  roles: [ingress, commands, step_results]
executor:
  group: executor
  roles: [step_requests]
memory:
  group: memory
  roles: [memory_writes]
policy:
  group: ""
  roles: []
observability:
  group: observability
  roles: [audit, workflow_events, usage, deadletters]
{{- end -}}

{{/* Service names in start order. */}}
{{- define "aios.serviceNames" -}}
[policy, memory, observability, executor, planner]
{{- end -}}

{{/*
One service's settings: `defaults` with `services.<name>` on top, maps merged
one level deep. Unlike mergeOverwrite this keeps an explicit `false` or `0`.
Usage: include "aios.service" (list $ "planner") | fromYaml
*/}}
{{- define "aios.service" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- $defaults := $root.Values.defaults -}}
{{- $own := index $root.Values.services $name -}}
{{- $out := dict -}}
{{- range $key, $value := $defaults -}}
{{- if hasKey $own $key -}}
{{- $mine := index $own $key -}}
{{- if and (kindIs "map" $value) (kindIs "map" $mine) -}}
{{- $merged := deepCopy $value -}}
{{- range $k, $v := $mine -}}
{{- $_ := set $merged $k $v -}}
{{- end -}}
{{- $_ := set $out $key $merged -}}
{{- else -}}
{{- $_ := set $out $key $mine -}}
{{- end -}}
{{- else -}}
{{- $_ := set $out $key $value -}}
{{- end -}}
{{- end -}}
{{- range $key, $value := $own -}}
{{- if not (hasKey $defaults $key) -}}
{{- $_ := set $out $key $value -}}
{{- end -}}
{{- end -}}
{{- $facts := index (include "aios.serviceFacts" $root | fromYaml) $name -}}
{{- $_ := set $out "name" $name -}}
{{- $_ := set $out "group" $facts.group -}}
{{- $_ := set $out "roles" $facts.roles -}}
{{- /* A consumer keeps a stable pod name (its Kafka static member id) across rollouts. */ -}}
{{- $_ := set $out "kind" (ternary "StatefulSet" "Deployment" (ne $facts.group "")) -}}
{{- $engine := $out.autoscaling.engine -}}
{{- if and (eq $facts.group "") (eq $engine "keda") -}}
{{- $engine = "hpa" -}}
{{- end -}}
{{- $_ := set $out "engine" $engine -}}
{{- toYaml $out -}}
{{- end -}}

{{- define "aios.image" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "aios.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "aios.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "aios.inferenceName" -}}
{{- printf "%s-inference" (include "aios.fullname" .) -}}
{{- end -}}

{{/* The URL the services call: an explicit one, or the serve Service KubeRay creates for the RayService. */}}
{{- define "aios.inferenceUrl" -}}
{{- if .Values.inference.url -}}
{{- .Values.inference.url -}}
{{- else if .Values.inference.rayService.enabled -}}
{{- printf "http://%s-serve-svc.%s.svc:%v" (include "aios.inferenceName" .) .Release.Namespace .Values.inference.rayService.servePort -}}
{{- else -}}
{{- fail "inference.url: set it, or enable inference.rayService" -}}
{{- end -}}
{{- end -}}

{{/* The Service on the low-latency workers' direct door (templates/inference-interactive.yaml). */}}
{{- define "aios.inferenceInteractiveName" -}}
{{- printf "%s-interactive" (include "aios.inferenceName" .) -}}
{{- end -}}

{{/*
The URL the services send interactive calls to: an explicit one, or the
low-latency tier's direct door when the services call this release's RayService
(not when inference.url points them at another inference service: its door is
unknown here); empty otherwise (they go through the inference URL, as they also
do when the door is unreachable).
*/}}
{{- define "aios.inferenceInteractiveUrl" -}}
{{- $rs := .Values.inference.rayService -}}
{{- if .Values.inference.interactiveUrl -}}
{{- .Values.inference.interactiveUrl -}}
{{- else if and $rs.enabled (gt (int $rs.interactivePort) 0) (not .Values.inference.url) -}}
{{- printf "http://%s.%s.svc:%d" (include "aios.inferenceInteractiveName" .) .Release.Namespace (int $rs.interactivePort) -}}
{{- end -}}
{{- end -}}

{{- define "aios.kafkaTlsDir" -}}/etc/aios/kafka-tls{{- end -}}

{{/*
The non-secret settings every mesh process shares (AIOS_*), as a map: the
ConfigMap's data, and the topics hook's env (a pre-install hook runs before
the ConfigMap exists).
*/}}
{{- define "aios.sharedConfig" -}}
{{- $v := .Values -}}
{{- $full := include "aios.fullname" . -}}
AIOS_KAFKA_BOOTSTRAP: {{ $v.kafka.bootstrap | quote }}
AIOS_TOPIC_PREFIX: {{ $v.kafka.topicPrefix | quote }}
AIOS_FETCH_WAIT_MS: {{ int64 $v.kafka.fetchWaitMs | quote }}
AIOS_BACKGROUND_FETCH_WAIT_MS: {{ int64 $v.kafka.backgroundFetchWaitMs | quote }}
AIOS_SESSION_TIMEOUT_MS: {{ int64 $v.kafka.sessionTimeoutMs | quote }}
AIOS_HEARTBEAT_INTERVAL_MS: {{ int64 $v.kafka.heartbeatIntervalMs | quote }}
AIOS_ASSIGNOR: {{ $v.kafka.assignor | quote }}
AIOS_KAFKA_SECURITY_PROTOCOL: {{ $v.kafka.securityProtocol | quote }}
{{- if hasPrefix "SASL_" $v.kafka.securityProtocol }}
AIOS_KAFKA_SASL_MECHANISM: {{ $v.kafka.sasl.mechanism | quote }}
AIOS_KAFKA_SASL_USERNAME: {{ $v.kafka.sasl.username | quote }}
{{- end }}
{{- if hasSuffix "SSL" $v.kafka.securityProtocol }}
AIOS_KAFKA_SSL_ENDPOINT_IDENTIFICATION: {{ $v.kafka.tls.endpointIdentification | quote }}
{{- if and $v.kafka.tls.existingSecret $v.kafka.tls.caKey }}
AIOS_KAFKA_SSL_CA_LOCATION: {{ printf "%s/%s" (include "aios.kafkaTlsDir" .) $v.kafka.tls.caKey | quote }}
{{- end }}
{{- if and $v.kafka.tls.existingSecret $v.kafka.tls.certKey }}
AIOS_KAFKA_SSL_CERTIFICATE_LOCATION: {{ printf "%s/%s" (include "aios.kafkaTlsDir" .) $v.kafka.tls.certKey | quote }}
AIOS_KAFKA_SSL_KEY_LOCATION: {{ printf "%s/%s" (include "aios.kafkaTlsDir" .) $v.kafka.tls.keyKey | quote }}
{{- end }}
{{- end }}
AIOS_CREATE_TOPICS_AT_START: {{ (not $v.topics.enabled) | quote }}
{{- if not $v.redis.existingSecret }}
AIOS_REDIS_URL: {{ $v.redis.url | quote }}
{{- end }}
AIOS_INFERENCE_URL: {{ include "aios.inferenceUrl" . | quote }}
AIOS_INFERENCE_INTERACTIVE_URL: {{ include "aios.inferenceInteractiveUrl" . | quote }}
{{- range $name := include "aios.serviceNames" . | fromYamlArray }}
AIOS_{{ upper $name }}_ADDR: {{ printf "%s:%v" (include "aios.serviceHost" (list $ $name)) (index $v.services $name).grpcPort | quote }}
{{- end }}
AIOS_METRICS_HOST: {{ $v.config.listenHost | quote }}
AIOS_LOG_LEVEL: {{ $v.config.logLevel | quote }}
AIOS_LOG_FORMAT: {{ $v.config.logFormat | quote }}
AIOS_OTLP_ENDPOINT: {{ $v.config.otlpEndpoint | quote }}
AIOS_MAX_RECORD_BYTES: {{ int64 $v.config.maxRecordBytes | quote }}
{{- end -}}

{{/* Secret-backed env (Redis URL, SASL password): only ever secretKeyRefs. */}}
{{- define "aios.secretEnv" -}}
{{- $v := .Values -}}
{{- if $v.redis.existingSecret }}
- name: AIOS_REDIS_URL
  valueFrom:
    secretKeyRef: {name: {{ $v.redis.existingSecret | quote }}, key: {{ $v.redis.urlKey | quote }}}
{{- end }}
{{- if hasPrefix "SASL_" $v.kafka.securityProtocol }}
- name: AIOS_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ $v.kafka.sasl.existingSecret | quote }}, key: {{ $v.kafka.sasl.passwordKey | quote }}}
{{- end }}
{{- end -}}

{{/* Volumes every mesh pod has: /tmp, and the Kafka TLS material when configured. */}}
{{- define "aios.volumes" -}}
{{- $root := index . 0 -}}
{{- $tmpSize := index . 1 -}}
- name: tmp
  emptyDir: {sizeLimit: {{ $tmpSize }}}
{{- if and (hasSuffix "SSL" $root.Values.kafka.securityProtocol) $root.Values.kafka.tls.existingSecret }}
- name: kafka-tls
  secret: {secretName: {{ $root.Values.kafka.tls.existingSecret | quote }}, defaultMode: 0440}
{{- end }}
{{- end -}}

{{- define "aios.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if and (hasSuffix "SSL" .Values.kafka.securityProtocol) .Values.kafka.tls.existingSecret }}
- name: kafka-tls
  mountPath: {{ include "aios.kafkaTlsDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "aios.podSecurity" -}}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
Refuse combinations the schema cannot express, naming the value to fix.
*/}}
{{- define "aios.validate" -}}
{{- $v := .Values -}}
{{- if and (hasPrefix "SASL_" $v.kafka.securityProtocol) (or (not $v.kafka.sasl.mechanism) (not $v.kafka.sasl.username) (not $v.kafka.sasl.existingSecret)) -}}
{{- fail (printf "kafka.sasl.mechanism, kafka.sasl.username and kafka.sasl.existingSecret are required with kafka.securityProtocol=%s" $v.kafka.securityProtocol) -}}
{{- end -}}
{{- if and (not (hasPrefix "SASL_" $v.kafka.securityProtocol)) (or $v.kafka.sasl.mechanism $v.kafka.sasl.username $v.kafka.sasl.existingSecret) -}}
{{- fail (printf "kafka.sasl.* is set but kafka.securityProtocol=%s does not use SASL (use SASL_SSL or SASL_PLAINTEXT)" $v.kafka.securityProtocol) -}}
{{- end -}}
{{- if and (not (hasSuffix "SSL" $v.kafka.securityProtocol)) $v.kafka.tls.existingSecret -}}
{{- fail (printf "kafka.tls.existingSecret is set but kafka.securityProtocol=%s does not use TLS (use SSL or SASL_SSL)" $v.kafka.securityProtocol) -}}
{{- end -}}
{{- if ne (not $v.kafka.tls.certKey) (not $v.kafka.tls.keyKey) -}}
{{- fail "kafka.tls.certKey and kafka.tls.keyKey go together (mutual TLS needs both)" -}}
{{- end -}}
{{- if and (or $v.kafka.tls.certKey $v.kafka.tls.keyKey) (not $v.kafka.tls.existingSecret) -}}
{{- fail "kafka.tls.certKey and kafka.tls.keyKey need kafka.tls.existingSecret" -}}
{{- end -}}
{{- if ge (int64 $v.kafka.heartbeatIntervalMs) (int64 $v.kafka.sessionTimeoutMs) -}}
{{- fail (printf "kafka.heartbeatIntervalMs (%v) must be below kafka.sessionTimeoutMs (%v); 0 picks a fifth of it" $v.kafka.heartbeatIntervalMs $v.kafka.sessionTimeoutMs) -}}
{{- end -}}
{{- $drift := $v.services.observability.drift -}}
{{- if mod (int64 $drift.windowRecords) (int64 $drift.stepRecords) -}}
{{- fail (printf "services.observability.drift.windowRecords (%v) must be a multiple of services.observability.drift.stepRecords (%v)" $drift.windowRecords $drift.stepRecords) -}}
{{- end -}}
{{- if gt (int64 $v.services.executor.claimThresholdBytes) (div (int64 $v.config.maxRecordBytes) 2) -}}
{{- fail (printf "services.executor.claimThresholdBytes (%v) must be at most half of config.maxRecordBytes (%v): an output just under it must still fit in a step result record" $v.services.executor.claimThresholdBytes $v.config.maxRecordBytes) -}}
{{- end -}}
{{- range $name := include "aios.serviceNames" . | fromYamlArray -}}
{{- $svc := include "aios.service" (list $ $name) | fromYaml -}}
{{- if and $svc.autoscaling.enabled (gt (int64 $svc.standbyLeaseMs) 0) -}}
{{- fail (printf "services.%s: standbyLeaseMs > 0 lets one replica consume at a time, so autoscaling would only add standbys; turn one of them off" $name) -}}
{{- end -}}
{{- if and $svc.autoscaling.enabled (gt (int $svc.autoscaling.minReplicas) (int $svc.autoscaling.maxReplicas)) -}}
{{- fail (printf "services.%s.autoscaling: minReplicas (%v) is above maxReplicas (%v)" $name $svc.autoscaling.minReplicas $svc.autoscaling.maxReplicas) -}}
{{- end -}}
{{- if and $svc.autoscaling.enabled (eq $svc.engine "keda") (ne $v.kafka.securityProtocol "PLAINTEXT") (not $v.keda.authenticationRef) -}}
{{- fail (printf "keda.authenticationRef: services.%s autoscales with KEDA on a Kafka that uses %s; name a TriggerAuthentication holding the credentials" $name $v.kafka.securityProtocol) -}}
{{- end -}}
{{- end -}}
{{- $rs := $v.inference.rayService -}}
{{- if and $rs.enabled (gt (int $rs.workerGroups.lowLatency.minReplicas) (int $rs.workerGroups.lowLatency.maxReplicas)) -}}
{{- fail "inference.rayService.workerGroups.lowLatency: minReplicas is above maxReplicas" -}}
{{- end -}}
{{- if and $rs.enabled (gt (int $rs.workerGroups.highThroughput.minReplicas) (int $rs.workerGroups.highThroughput.maxReplicas)) -}}
{{- fail "inference.rayService.workerGroups.highThroughput: minReplicas is above maxReplicas" -}}
{{- end -}}
{{- include "aios.validateAuth" . -}}
{{- end -}}

{{/* A map of integers as JSON (values may arrive as floats). */}}
{{- define "aios.intMap" -}}
{{- $out := dict -}}
{{- range $k, $v := . }}{{ $_ := set $out $k (int $v) }}{{ end -}}
{{- toJson $out -}}
{{- end -}}

{{/* Environment of the Ray containers (the image sets PYTHONPATH, HOME and the model cache). */}}
{{- define "aios.rayEnv" -}}
- name: TOKENIZERS_PARALLELISM
  value: "false"
- name: AIOS_LOG_LEVEL
  value: {{ .Values.config.logLevel | quote }}
- name: AIOS_LOG_FORMAT
  value: {{ .Values.config.logFormat | quote }}
- name: AIOS_OTLP_ENDPOINT
  value: {{ .Values.config.otlpEndpoint | quote }}
{{- end -}}

{{/* Writable space of the Ray pods: /tmp (session dir, logs) and /dev/shm (object store). */}}
{{- define "aios.rayVolumes" -}}
- name: tmp
  emptyDir: {sizeLimit: {{ .Values.inference.rayService.tmpSizeLimit }}}
- name: dshm
  emptyDir: {medium: Memory}
{{- end -}}
