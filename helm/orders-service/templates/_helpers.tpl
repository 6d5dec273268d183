{{/* Names, labels and the list of Deployments this release runs. */}}

{{- define "orders-service.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "orders-service.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "orders-service.selectorLabels" -}}
app.kubernetes.io/name: {{ include "orders-service.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "orders-service.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "orders-service.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: orders-service
{{- end -}}

{{- define "orders-service.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "orders-service.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "orders-service.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "orders-service.secretName" -}}
{{- default (include "orders-service.fullname" .) .Values.secret.existingSecret -}}
{{- end -}}

{{/*
The Deployments as a YAML list: one running every role, or one per role. Each has a
name suffix, its APP_ROLES, replicas, resources, and whether it serves the API (the
Service, the HPA and the Gateway routes go to those pods).
*/}}
{{- define "orders-service.deployments" -}}
{{- if .Values.roles.split }}
- suffix: "-api"
  component: api
  roles: api
  api: true
  replicas: {{ .Values.roles.api.replicas }}
  resources: {{ toJson (default .Values.resources .Values.roles.api.resources) }}
- suffix: "-relay"
  component: relay
  roles: relay
  api: false
  replicas: {{ .Values.roles.relay.replicas }}
  resources: {{ toJson (default .Values.resources .Values.roles.relay.resources) }}
- suffix: "-consumer"
  component: consumer
  roles: consumer
  api: false
  replicas: {{ .Values.roles.consumer.replicas }}
  resources: {{ toJson (default .Values.resources .Values.roles.consumer.resources) }}
{{- else }}
- suffix: ""
  component: server
  roles: api,relay,consumer
  api: true
  replicas: {{ .Values.replicaCount }}
  resources: {{ toJson .Values.resources }}
{{- end }}
{{- end -}}

{{/* Annotations that keep sidecars out of pods that must not have them (hooks, tests). */}}
{{- define "orders-service.noSidecar" -}}
linkerd.io/inject: disabled
sidecar.istio.io/inject: "false"
{{- end -}}

{{/* A restricted container security context for hook and test pods. */}}
{{- define "orders-service.restrictedContainer" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

