{{/*
The Serve config KubeRay deploys (serveConfigV2): the values' config with the
low-latency tier's direct door added to the inference application's args, so
the port the replicas bind is the one the worker container, the Service and the
services' URL name (inference.rayService.interactivePort), even when a values
file replaces serveConfigV2 wholesale (ci/gpu-values.yaml does).
*/}}
{{- define "aios.serveConfig" -}}
{{- $rs := .Values.inference.rayService -}}
{{- $port := int $rs.interactivePort -}}
{{- $config := deepCopy $rs.serveConfigV2 -}}
{{- $found := false -}}
{{- range $app := $config.applications -}}
{{- if eq (toString $app.import_path) "services.inference.app:app_builder" -}}
{{- $found = true -}}
{{- $args := default dict $app.args -}}
{{- $tier := default dict $args.low_latency -}}
{{- if and (hasKey $tier "direct_port") (ne (int $tier.direct_port) $port) -}}
{{- fail (printf "inference.rayService.serveConfigV2: application %q sets args.low_latency.direct_port: %v, but the door's port is inference.rayService.interactivePort (%d), which the Service and the services' URL use; remove direct_port from serveConfigV2 and set interactivePort instead" (toString $app.name) $tier.direct_port $port) -}}
{{- end -}}
{{- if and (gt $port 0) (has (toString (default "" $tier.direct_host)) (list "127.0.0.1" "localhost" "::1")) -}}
{{- fail (printf "inference.rayService.serveConfigV2: application %q sets args.low_latency.direct_host: %s, a loopback address the interactive Service cannot reach; remove it (the chart binds 0.0.0.0) or use :: on IPv6-only pods" (toString $app.name) $tier.direct_host) -}}
{{- end -}}
{{- if gt $port 0 -}}
{{- $_ := set $tier "direct_port" $port -}}
{{- if not $tier.direct_host -}}
{{- $_ := set $tier "direct_host" "0.0.0.0" -}}
{{- end -}}
{{- $_ := set $args "low_latency" $tier -}}
{{- $_ := set $app "args" $args -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (gt $port 0) (not $found) -}}
{{- fail (printf "inference.rayService.interactivePort is %d but inference.rayService.serveConfigV2 has no application with import_path services.inference.app:app_builder to serve it; set interactivePort: 0" $port) -}}
{{- end -}}
{{- if and (gt $port 0) (or (eq $port (int $rs.servePort)) (eq $port 8080)) -}}
{{- fail (printf "inference.rayService.interactivePort (%d) is taken on the low-latency workers by Serve (servePort) or metrics (8080); pick another port, or 0 to turn the door off" $port) -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}
