{{/*
gRPC authentication and authorization (services/common/auth.py, authz.py).
Under auth.mode mtls or tls every service pod mounts, read-only:

  /etc/aios/grpc   tls.crt, tls.key, ca.crt, token, jwks.json   (a projected
                   volume of the Secrets the values name; cert-manager's
                   Secret for the first three when auth.certManager.enabled)
  /etc/aios/authz  authz.cedar, authz.cedarschema              (ConfigMap)
  /etc/aios/probe  grpc_health_probe.py                         (ConfigMap)

and points the AIOS_GRPC_TLS_*, AIOS_TOKEN_FILE, AIOS_AUTH_* and AIOS_AUTHZ_*
settings at them. The `helm test` pod mounts only the CA (and under mtls a
client certificate and key): health needs no token. Under auth.mode none
nothing is mounted and the kubelet's own gRPC probe is used.
*/}}
{{- define "aios.grpcDir" -}}/etc/aios/grpc{{- end -}}
{{- define "aios.authzDir" -}}/etc/aios/authz{{- end -}}
{{- define "aios.probeDir" -}}/etc/aios/probe{{- end -}}

{{/* "true" when gRPC runs over TLS (mtls or tls), else empty. */}}
{{- define "aios.authOn" -}}
{{- if ne .Values.auth.mode "none" }}true{{ end -}}
{{- end -}}

{{/* The DNS name other services dial for one service: (list $ "planner"). Its certificate must carry it. */}}
{{- define "aios.serviceHost" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s.%s.svc" (include "aios.fullname" $root) (index . 1) $root.Release.Namespace -}}
{{- end -}}

{{/* The Secret with a service's token and the issuer's JWKS (and its certificate without cert-manager): (list $ "planner"). */}}
{{- define "aios.credentialSecret" -}}
{{- $root := index . 0 -}}
{{- default $root.Values.auth.existingSecret (index $root.Values.auth.serviceSecrets (index . 1)) -}}
{{- end -}}

{{/* The Secret cert-manager writes for one identity (a service name or "cli"). */}}
{{- define "aios.certManagerSecret" -}}
{{- printf "%s-%s-grpc-tls" (include "aios.fullname" (index . 0)) (index . 1) -}}
{{- end -}}

{{/* The `helm test` pod's Secret: auth.cli.existingSecret, else its Certificate's, else the shared one. */}}
{{- define "aios.cliSecret" -}}
{{- $a := .Values.auth -}}
{{- if $a.cli.existingSecret -}}
{{- $a.cli.existingSecret -}}
{{- else if $a.certManager.enabled -}}
{{- include "aios.certManagerSecret" (list . "cli") -}}
{{- else -}}
{{- $a.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* Environment of a gRPC process: (list $ "planner") for a service, (list $ "cli") for the test pod. */}}
{{- define "aios.grpcAuthEnv" -}}
{{- $root := index . 0 -}}
{{- $who := index . 1 -}}
{{- $a := $root.Values.auth -}}
{{- $dir := include "aios.grpcDir" $root -}}
- name: AIOS_GRPC_AUTH
  value: {{ $a.mode | quote }}
{{- if include "aios.authOn" $root }}
- name: AIOS_GRPC_TLS_CA_FILE
  value: {{ printf "%s/ca.crt" $dir | quote }}
{{- if or (ne $who "cli") (eq $a.mode "mtls") }}
- name: AIOS_GRPC_TLS_CERT_FILE
  value: {{ printf "%s/tls.crt" $dir | quote }}
- name: AIOS_GRPC_TLS_KEY_FILE
  value: {{ printf "%s/tls.key" $dir | quote }}
{{- end }}
{{- if ne $who "cli" }}
- name: AIOS_TOKEN_FILE
  value: {{ printf "%s/token" $dir | quote }}
- name: AIOS_AUTH_JWKS_FILE
  value: {{ printf "%s/jwks.json" $dir | quote }}
- name: AIOS_AUTH_ISSUER
  value: {{ $a.issuer | quote }}
- name: AIOS_AUTH_AUDIENCE
  value: {{ $a.audience | quote }}
- name: AIOS_AUTH_LEEWAY_S
  value: {{ int $a.leewaySeconds | quote }}
- name: AIOS_AUTHZ_POLICY_FILE
  value: {{ printf "%s/authz.cedar" (include "aios.authzDir" $root) | quote }}
- name: AIOS_AUTHZ_SCHEMA_FILE
  value: {{ printf "%s/authz.cedarschema" (include "aios.authzDir" $root) | quote }}
- name: AIOS_AUTHZ_RELOAD_S
  value: {{ $a.authz.reloadSeconds | toString | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Volumes of a gRPC process: (list $ "planner") or (list $ "cli"); nothing under auth.mode none. */}}
{{- define "aios.grpcAuthVolumes" -}}
{{- $root := index . 0 -}}
{{- $who := index . 1 -}}
{{- $a := $root.Values.auth -}}
{{- $k := $a.keys -}}
{{- if include "aios.authOn" $root }}
- name: grpc-credentials
  projected:
    defaultMode: 0440
    sources:
{{- if eq $who "cli" }}
      - secret:
          name: {{ include "aios.cliSecret" $root | quote }}
          items:
            {{- $fixed := and $a.certManager.enabled (not $a.cli.existingSecret) }}
            - {key: {{ ternary "ca.crt" $k.ca $fixed | quote }}, path: ca.crt}
            {{- if eq $a.mode "mtls" }}
            - {key: {{ ternary "tls.crt" $k.cert $fixed | quote }}, path: tls.crt}
            - {key: {{ ternary "tls.key" $k.key $fixed | quote }}, path: tls.key}
            {{- end }}
{{- else if $a.certManager.enabled }}
      - secret:
          name: {{ include "aios.certManagerSecret" (list $root $who) | quote }}
          items:
            - {key: tls.crt, path: tls.crt}
            - {key: tls.key, path: tls.key}
            - {key: ca.crt, path: ca.crt}
      - secret:
          name: {{ include "aios.credentialSecret" (list $root $who) | quote }}
          items:
            - {key: {{ $k.token | quote }}, path: token}
            - {key: {{ $k.jwks | quote }}, path: jwks.json}
{{- else }}
      - secret:
          name: {{ include "aios.credentialSecret" (list $root $who) | quote }}
          items:
            - {key: {{ $k.cert | quote }}, path: tls.crt}
            - {key: {{ $k.key | quote }}, path: tls.key}
            - {key: {{ $k.ca | quote }}, path: ca.crt}
            - {key: {{ $k.token | quote }}, path: token}
            - {key: {{ $k.jwks | quote }}, path: jwks.json}
{{- end }}
{{- if ne $who "cli" }}
- name: authz
  configMap:
    name: {{ default (printf "%s-authz" (include "aios.fullname" $root)) $a.authz.existingConfigMap | quote }}
    items:
      - {key: authz.cedar, path: authz.cedar}
      - {key: authz.cedarschema, path: authz.cedarschema}
- name: grpc-probe
  configMap:
    name: {{ printf "%s-grpc-probe" (include "aios.fullname" $root) | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "aios.grpcAuthMounts" -}}
{{- $root := index . 0 -}}
{{- $who := index . 1 -}}
{{- if include "aios.authOn" $root }}
- name: grpc-credentials
  mountPath: {{ include "aios.grpcDir" $root }}
  readOnly: true
{{- if ne $who "cli" }}
- name: authz
  mountPath: {{ include "aios.authzDir" $root }}
  readOnly: true
- name: grpc-probe
  mountPath: {{ include "aios.probeDir" $root }}
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{/*
How the kubelet checks a service's gRPC health: (list $ $svc). Plaintext
(auth.mode none): its own gRPC probe. Over TLS that probe cannot connect (it
speaks plaintext and shows no client certificate), so an exec probe runs
files/grpc_health_probe.py in the container: it dials the local port, checks
the server's certificate for the Service's DNS name against the mounted CA,
shows the container's own certificate and calls Health/Check (no token).
*/}}
{{- define "aios.probeHandler" -}}
{{- $root := index . 0 -}}
{{- $svc := index . 1 -}}
{{- if include "aios.authOn" $root -}}
{{- $host := $root.Values.config.listenHost -}}
{{- $local := $host -}}
{{- if eq $host "0.0.0.0" }}{{ $local = "127.0.0.1" }}{{ else if eq $host "::" }}{{ $local = "::1" }}{{ end -}}
exec:
  command:
    - python
    - {{ printf "%s/grpc_health_probe.py" (include "aios.probeDir" $root) }}
    - --timeout
    - {{ int $svc.probes.timeoutSeconds | quote }}
    - {{ include "aios.listenAddr" (list $local $svc.grpcPort) | quote }}
    - {{ include "aios.serviceHost" (list $root $svc.name) | quote }}
{{- else -}}
grpc: {port: {{ int $svc.grpcPort }}}
{{- end -}}
{{- end -}}

{{/* Refuse auth values that cannot work, naming the value to fix (called from aios.validate). */}}
{{- define "aios.validateAuth" -}}
{{- $v := .Values -}}
{{- $a := $v.auth -}}
{{- $named := list -}}
{{- range $name, $secret := $a.serviceSecrets }}{{ if $secret }}{{ $named = append $named $name }}{{ end }}{{ end -}}
{{- if eq $a.mode "none" -}}
{{- if or $a.existingSecret $named $a.cli.existingSecret $a.certManager.enabled -}}
{{- fail "auth.existingSecret, auth.serviceSecrets, auth.cli.existingSecret and auth.certManager are set but auth.mode=none mounts no credential (plaintext): use mtls or tls, or unset them" -}}
{{- end -}}
{{- else -}}
{{- if not $a.issuer -}}
{{- fail (printf "auth.issuer is required with auth.mode=%s: the token issuer (iss) the services accept (or set auth.mode=none for a development install)" $a.mode) -}}
{{- end -}}
{{- range $name := include "aios.serviceNames" . | fromYamlArray -}}
{{- if not (include "aios.credentialSecret" (list $ $name)) -}}
{{- fail (printf "auth.serviceSecrets.%s or auth.existingSecret: name the existing Secret with %s's %s (keys auth.keys.*) for auth.mode=%s, or set auth.mode=none for a development install" $name $name (ternary "token and the issuer's JWKS" "certificate, key, CA, token and the issuer's JWKS" $a.certManager.enabled) $a.mode) -}}
{{- end -}}
{{- end -}}
{{- if and $a.certManager.enabled (not $a.certManager.issuerRef.name) -}}
{{- fail "auth.certManager.issuerRef.name: name the cert-manager Issuer or ClusterIssuer of the mesh CA" -}}
{{- end -}}
{{- if and $v.helmTest.enabled (not (include "aios.cliSecret" .)) -}}
{{- fail (printf "auth.cli.existingSecret (or auth.existingSecret): the helm test pod needs the mesh CA%s for auth.mode=%s (or set helmTest.enabled=false)" (ternary " and a client certificate" "" (eq $a.mode "mtls")) $a.mode) -}}
{{- end -}}
{{- end -}}
{{- end -}}
