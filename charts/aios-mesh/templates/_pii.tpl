{{/*
The PII master key (services/common/pii_tokens.py): policy seals the values of
pii.tokenize_fields as reversible per-tenant tokens with it, the executor opens
them at the connector boundary. Only those two mount it, read-only, from
pii.existingSecret at /etc/aios/pii (AIOS_PII_KEY_FILE); no other pod sees it.
Without a Secret nothing is mounted and policy masks those fields instead.
*/}}
{{- define "aios.piiDir" -}}/etc/aios/pii{{- end -}}

{{/* "true" when this service holds the key: (list $ "policy"). */}}
{{- define "aios.piiHolder" -}}
{{- $root := index . 0 -}}
{{- if and $root.Values.pii.existingSecret (has (index . 1) (list "policy" "executor")) }}true{{ end -}}
{{- end -}}

{{- define "aios.piiEnv" -}}
{{- if include "aios.piiHolder" . }}
- name: AIOS_PII_KEY_FILE
  value: {{ printf "%s/master.key" (include "aios.piiDir" (index . 0)) | quote }}
{{- end }}
{{- end -}}

{{- define "aios.piiMounts" -}}
{{- if include "aios.piiHolder" . }}
- name: pii-key
  mountPath: {{ include "aios.piiDir" (index . 0) }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "aios.piiVolumes" -}}
{{- $root := index . 0 -}}
{{- if include "aios.piiHolder" . }}
- name: pii-key
  secret:
    secretName: {{ $root.Values.pii.existingSecret | quote }}
    defaultMode: 0440
    items:
      - {key: {{ $root.Values.pii.key | quote }}, path: master.key}
{{- end }}
{{- end -}}
