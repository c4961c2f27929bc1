{{/*
Chart name, overridable with nameOverride.
*/}}
{{- define "micromine.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the prefix of every resource this release creates. Kept to 40 characters so
that suffixed names ("-agent", "-data", "-leader") and the Deployment's and DaemonSet's pod
names stay within Kubernetes' limits.
*/}}
{{- define "micromine.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "micromine.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every resource.
*/}}
{{- define "micromine.labels" -}}
helm.sh/chart: {{ include "micromine.chart" . }}
app.kubernetes.io/name: {{ include "micromine.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: micromine
{{- end }}

{{/*
Selector labels of the controller pods. Immutable once the Deployment exists: never add to them.
*/}}
{{- define "micromine.controller.selectorLabels" -}}
app.kubernetes.io/name: {{ include "micromine.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{/*
Selector labels of the agent pods.
*/}}
{{- define "micromine.agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "micromine.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end }}

{{/*
The controller's ServiceAccount.
*/}}
{{- define "micromine.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "micromine.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Images: [REGISTRY/]REPOSITORY:TAG, the names and tags scripts/dist gives dist/oci/; the tags
default to the chart's appVersion (the Cargo workspace version), the agent's registry to the
controller's.
*/}}
{{- define "micromine.image" -}}
{{- $registry := index . 0 }}{{- $image := index . 1 }}{{- $appVersion := index . 2 }}
{{- $name := printf "%s:%s" $image.repository (default $appVersion $image.tag) }}
{{- if $registry }}{{ printf "%s/%s" $registry $name }}{{ else }}{{ $name }}{{ end }}
{{- end }}

{{- define "micromine.controller.image" -}}
{{- include "micromine.image" (list .Values.image.registry .Values.image .Chart.AppVersion) }}
{{- end }}

{{- define "micromine.agent.image" -}}
{{- include "micromine.image" (list (default .Values.image.registry .Values.agent.image.registry) .Values.agent.image .Chart.AppVersion) }}
{{- end }}

{{/*
The in-cluster address agents and the serving certificate use.
*/}}
{{- define "micromine.controller.host" -}}
{{- printf "%s.%s.svc" (include "micromine.fullname" .) .Release.Namespace }}
{{- end }}

{{/*
The restricted container securityContext both workloads run with.
*/}}
{{- define "micromine.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}
