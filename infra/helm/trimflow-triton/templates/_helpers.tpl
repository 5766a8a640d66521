{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "trimflow-triton.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object name: the release name, with the chart name appended unless already in it. */}}
{{- define "trimflow-triton.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "trimflow-triton.selectorLabels" -}}
app.kubernetes.io/name: {{ include "trimflow-triton.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "trimflow-triton.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "trimflow-triton.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: inference-server
app.kubernetes.io/part-of: trimflow
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "trimflow-triton.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "trimflow-triton.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The model repository URI, checked: Triton reads it from S3 only in this chart. */}}
{{- define "trimflow-triton.modelRepository" -}}
{{- $repo := required "modelRepository is required: s3://bucket/prefix (or s3://host:port/bucket/prefix)" .Values.modelRepository }}
{{- if not (hasPrefix "s3://" $repo) }}
{{- fail (printf "modelRepository must be an s3:// URI, got %q" $repo) }}
{{- end }}
{{- $repo }}
{{- end }}
