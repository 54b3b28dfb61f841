{{/* Names and labels shared by the templates. */}}
{{- define "podmig.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}

{{- define "podmig.labels" -}}
app.kubernetes.io/name: podmig
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "podmig.tlsSecret" -}}
{{ default (printf "%s-node-ca" .Release.Name) .Values.tls.existingSecret }}
{{- end -}}
