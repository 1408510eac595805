{{- /* Schemas of the stored kinds (VirtualService, DestinationRule, Gateway, HTTPRoute): the
fields the mesh reads are typed, route details are kept as given (preserve-unknown-fields)
until the waypoint translates them. */ -}}
{{- define "ambient.crd.virtualService" -}}
type: object
properties:
  spec:
    type: object
    description: Istio VirtualService (routing for hosts; applied by waypoints).
    properties:
      hosts:
        type: array
        items: {type: string}
      gateways:
        type: array
        description: Gateways this applies to; absent = mesh.
        items: {type: string}
      exportTo:
        type: array
        items: {type: string}
      http:
        type: array
        items:
          type: object
          x-kubernetes-preserve-unknown-fields: true
      tcp:
        type: array
        items:
          type: object
          x-kubernetes-preserve-unknown-fields: true
      tls:
        type: array
        items:
          type: object
          x-kubernetes-preserve-unknown-fields: true
  status:
    type: object
    x-kubernetes-preserve-unknown-fields: true
{{- end }}
{{- define "ambient.crd.destinationRule" -}}
type: object
properties:
  spec:
    type: object
    description: Istio DestinationRule (subsets and traffic policy; applied by waypoints).
    required: [host]
    properties:
      host: {type: string}
      exportTo:
        type: array
        items: {type: string}
      trafficPolicy:
        type: object
        x-kubernetes-preserve-unknown-fields: true
      subsets:
        type: array
        items:
          type: object
          required: [name]
          properties:
            name: {type: string}
            labels:
              type: object
              additionalProperties: {type: string}
            trafficPolicy:
              type: object
              x-kubernetes-preserve-unknown-fields: true
      workloadSelector:
        type: object
        properties:
          matchLabels:
            type: object
            additionalProperties: {type: string}
  status:
    type: object
    x-kubernetes-preserve-unknown-fields: true
{{- end }}
{{- define "ambient.crd.gateway" -}}
type: object
properties:
  spec:
    type: object
    description: Gateway API Gateway. A waypoint is gatewayClassName istio-waypoint with one listener {name mesh, port 15008, protocol HBONE}.
    required: [gatewayClassName, listeners]
    properties:
      gatewayClassName:
        type: string
        minLength: 1
      listeners:
        type: array
        minItems: 1
        maxItems: 64
        items:
          type: object
          required: [name, port, protocol]
          properties:
            name: {type: string, minLength: 1}
            hostname: {type: string}
            port: {type: integer, minimum: 1, maximum: 65535}
            protocol: {type: string, minLength: 1}
            tls:
              type: object
              x-kubernetes-preserve-unknown-fields: true
            allowedRoutes:
              type: object
              x-kubernetes-preserve-unknown-fields: true
      addresses:
        type: array
        items:
          type: object
          properties:
            type: {type: string}
            value: {type: string}
      infrastructure:
        type: object
        x-kubernetes-preserve-unknown-fields: true
  status:
    type: object
    x-kubernetes-preserve-unknown-fields: true
{{- end }}
{{- define "ambient.crd.httpRoute" -}}
type: object
properties:
  spec:
    type: object
    description: Gateway API HTTPRoute (attached to a waypoint via a Service parentRef).
    properties:
      parentRefs:
        type: array
        items:
          type: object
          required: [name]
          properties:
            group: {type: string}
            kind: {type: string}
            namespace: {type: string}
            name: {type: string}
            sectionName: {type: string}
            port: {type: integer, minimum: 1, maximum: 65535}
      hostnames:
        type: array
        items: {type: string}
      rules:
        type: array
        items:
          type: object
          x-kubernetes-preserve-unknown-fields: true
  status:
    type: object
    x-kubernetes-preserve-unknown-fields: true
{{- end }}
