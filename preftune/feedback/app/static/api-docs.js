// Swagger UI for the JSON API (a file, not an inline script: the page's CSP allows no inline code).
window.ui = SwaggerUIBundle({ url: "/api/v1/openapi.json", dom_id: "#swagger-ui", deepLinking: true });
