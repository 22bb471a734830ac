{{/* The chart name, or nameOverride. */}}
{{- define "cplink.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The name of the objects this chart creates: fullnameOverride, else the release name when it
already contains the chart name, else "<release>-<chart>". Truncated to 63 characters.
*/}}
{{- define "cplink.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "cplink.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object, without a component. */}}
{{- define "cplink.commonLabels" -}}
helm.sh/chart: {{ include "cplink.chart" . }}
app.kubernetes.io/name: {{ include "cplink.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels of the operator's objects. */}}
{{- define "cplink.labels" -}}
{{ include "cplink.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels that select the operator pod. */}}
{{- define "cplink.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cplink.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "cplink.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cplink.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image, with the chart's appVersion as the default tag. */}}
{{- define "cplink.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The leader Lease of the operator's replicas. */}}
{{- define "cplink.leaseName" -}}
{{- default (include "cplink.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
Labels of the monitoring objects: the chart's, with component "monitoring", plus the extra
labels given (for a Prometheus' or Grafana's selectors). Called with (list . extraLabels).
*/}}
{{- define "cplink.monitoringLabels" -}}
{{- $root := index . 0 }}
{{- $labels := include "cplink.commonLabels" $root | fromYaml }}
{{- $_ := set $labels "app.kubernetes.io/component" "monitoring" }}
{{- toYaml (merge $labels (deepCopy (index . 1 | default dict))) }}
{{- end }}
