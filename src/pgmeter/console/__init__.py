"""The usage console: a few static pages the api serves at ``/``.

Plain HTML and JavaScript modules, no build step: the browser calls the same
public ``/api/v1`` routes as every other client, with the token the user enters,
so the console can show no more than that token may see. The vendored libraries
(Chart.js, RapiDoc) and their licences are in ``static/vendor``.
"""
