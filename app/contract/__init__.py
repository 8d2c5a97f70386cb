"""The service's contract, beneath every other layer: the kinds of things it names (kinds.py), a job's
hyperparameters (hyperparameters.py) and the API's request and response models (schemas.py). The database,
the services, the API and the client all import it; it imports none of them, nor torch, nor FastAPI, so
the client (app/client.py) installs and loads without the server's stack."""
