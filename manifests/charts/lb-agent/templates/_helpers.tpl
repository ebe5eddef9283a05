{{/* The chart's name, for app.kubernetes.io/name. */}}
{{- define "lb-agent.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The objects' name: the release name, with the chart's name added unless the release name has
it already ("lb-agent" stays "lb-agent").
*/}}
{{- define "lb-agent.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Chart name and version, for helm.sh/chart. */}}
{{- define "lb-agent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The labels that select the DaemonSet's pods: they must never change after install. */}}
{{- define "lb-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lb-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The standard labels of every object. */}}
{{- define "lb-agent.labels" -}}
helm.sh/chart: {{ include "lb-agent.chart" . }}
{{ include "lb-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: service-proxy
app.kubernetes.io/part-of: lb-agent
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The port of a bind address, "0.0.0.0:10256" or "[::]:10256", as a number. */}}
{{- define "lb-agent.port" -}}
{{- splitList ":" . | last | int }}
{{- end }}
