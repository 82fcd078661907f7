{{/* Chart name, overridable. */}}
{{- define "portcullis.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the prefix of every object; cluster-scoped objects are named from it, so it includes the release. */}}
{{- define "portcullis.fullname" -}}
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

{{- define "portcullis.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels (https://kubernetes.io/docs/concepts/overview/working-with-objects/common-labels/). */}}
{{- define "portcullis.labels" -}}
helm.sh/chart: {{ include "portcullis.chart" . }}
{{ include "portcullis.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: portcullis
{{- end }}

{{- define "portcullis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "portcullis.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{- define "portcullis.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "portcullis.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Name of the MutatingWebhookConfiguration (cluster-scoped, so derived from the release). */}}
{{- define "portcullis.webhookConfigName" -}}
{{- include "portcullis.fullname" . }}
{{- end }}

{{/* Name of the webhook Service. */}}
{{- define "portcullis.webhookServiceName" -}}
{{- printf "%s-webhook" (include "portcullis.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Secret holding the webhook serving certificate (existing, or managed by the controller). */}}
{{- define "portcullis.webhookCertSecret" -}}
{{- default (printf "%s-webhook-tls" (include "portcullis.fullname" .)) .Values.webhook.existingCertSecret }}
{{- end }}

{{/* True (non-empty) when the webhook's serving certificate comes from a mounted Secret rather than being managed
by the controller: `webhook.existingCertSecret` or cert-manager. */}}
{{- define "portcullis.webhookCertMounted" -}}
{{- if or .Values.webhook.existingCertSecret .Values.webhook.certManager.enabled }}true{{ end }}
{{- end }}

{{/* The controller image: `repository@digest` when a digest is set, else `repository:tag` (tag default: appVersion). */}}
{{- define "portcullis.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "portcullis.sidecarImage" -}}
{{- printf "%s:%s" .Values.sidecar.image.repository (default .Chart.AppVersion .Values.sidecar.image.tag) }}
{{- end }}
