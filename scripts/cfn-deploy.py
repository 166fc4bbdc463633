#!/usr/bin/env python3
"""Deploy a CloudFormation template and print the stack's outputs as JSON.

    scripts/cfn-deploy.py --stack NAME --template FILE [--param KEY=VALUE ...] [--code-zip ZIP]

Prints one JSON object: {"stack", "status", "resources": [{"logical", "type", "physical"}],
"outputs": {key: value}}; "resources" lists what was created (has a physical id). Exits 1 (with the stack's failure events on stderr) when the stack
does not reach CREATE_COMPLETE.

--code-zip uploads a Lambda zip to a bucket of its own first and sets the CodeBucket and
CodeKey parameters to it, as an operator does before deploying a function template.

Run with the moto venv's python (boto3): ~/.cache/sluice/venv/bin/python. Endpoint, region and
credentials come from the standard AWS variables (scripts/moto.sh start exports them for moto);
without AWS_ENDPOINT_URL this deploys to real AWS, which is what an operator wants and a test
must never do, so tests check the variable first.
"""

import argparse
import json
import os
import sys
import time

import boto3

# moto creates the tested stacks in about 2 s; real AWS takes minutes (IAM, Lambda).
POLL_SECONDS = 0.2
TIMEOUT_SECONDS = 1800


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stack", required=True)
    ap.add_argument("--template", required=True)
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--code-zip", help="upload this zip and pass it as CodeBucket/CodeKey")
    args = ap.parse_args()

    params = {}
    for kv in args.param:
        key, sep, value = kv.partition("=")
        if not sep:
            ap.error(f"--param {kv!r}: expected KEY=VALUE")
        params[key] = value

    # The Rust SDK reads AWS_REGION; boto3 only AWS_DEFAULT_REGION.
    session = boto3.session.Session(
        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    )
    if args.code_zip:
        s3 = session.client("s3")
        bucket = f"{args.stack.lower()}-code"[:63]
        s3.create_bucket(Bucket=bucket)
        key = params.get("CodeKey", "bootstrap.zip")
        with open(args.code_zip, "rb") as f:
            s3.put_object(Bucket=bucket, Key=key, Body=f.read())
        params["CodeBucket"] = bucket
        params["CodeKey"] = key

    with open(args.template) as f:
        body = f.read()
    cfn = session.client("cloudformation")
    cfn.create_stack(
        StackName=args.stack,
        TemplateBody=body,
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()],
        # The function templates create an IAM role (with a generated name).
        Capabilities=["CAPABILITY_IAM"],
    )
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while True:
        stack = cfn.describe_stacks(StackName=args.stack)["Stacks"][0]
        status = stack["StackStatus"]
        if not status.endswith("_IN_PROGRESS"):
            break
        if time.monotonic() > deadline:
            print(f"cfn-deploy: {args.stack} still {status}", file=sys.stderr)
            return 1
        time.sleep(POLL_SECONDS)

    if status != "CREATE_COMPLETE":
        print(f"cfn-deploy: {args.stack}: {status}", file=sys.stderr)
        for ev in cfn.describe_stack_events(StackName=args.stack)["StackEvents"]:
            if ev.get("ResourceStatus", "").endswith("FAILED"):
                print(
                    f"  {ev['LogicalResourceId']} ({ev['ResourceType']}): "
                    f"{ev.get('ResourceStatusReason', '')}",
                    file=sys.stderr,
                )
        return 1

    # Only what was created: moto lists resources it accepted without creating them
    # (alarms, bucket policies) with neither a logical nor a physical id.
    resources = [
        {
            "logical": r["LogicalResourceId"],
            "type": r["ResourceType"],
            "physical": r["PhysicalResourceId"],
        }
        for r in cfn.describe_stack_resources(StackName=args.stack)["StackResources"]
        if r.get("LogicalResourceId") and r.get("PhysicalResourceId")
    ]
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
    json.dump(
        {"stack": args.stack, "status": status, "resources": resources, "outputs": outputs},
        sys.stdout,
        indent=2,
    )
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
