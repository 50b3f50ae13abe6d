using System.Diagnostics;
using System.Diagnostics.Metrics;
using OffloadRpc.Internal;

namespace OffloadRpc;

/// <summary>
/// The names under which OffloadRpc reports traces and metrics, following OpenTelemetry's RPC semantic
/// conventions (<c>rpc.system</c> = "offloadrpc"). Subscribe with
/// <c>tracing.AddSource(OffloadRpcTelemetry.ActivitySourceName)</c> and <c>metrics.AddMeter(OffloadRpcTelemetry.MeterName)</c>.
/// </summary>
public static class OffloadRpcTelemetry
{
    /// <summary>The ActivitySource: a client span and a server span per call (the server's is the client's child).</summary>
    public const string ActivitySourceName = "OffloadRpc";

    /// <summary>The Meter: call durations, calls started and completed by status, active calls, bytes by transfer mode, arena bytes in use, connections.</summary>
    public const string MeterName = "OffloadRpc";

    /// <summary>The value of <c>rpc.system</c>.</summary>
    public const string RpcSystem = "offloadrpc";
}

/// <summary>The instruments and the activity source; every record checks Enabled first, so nobody listening costs a branch.</summary>
internal static class Telemetry
{
    private const string Version = "1.0.0";

    public static readonly ActivitySource Source = new(OffloadRpcTelemetry.ActivitySourceName, Version);

    public static readonly Meter Meter = new(OffloadRpcTelemetry.MeterName, Version);

    /// <summary>The status tag of completed calls (as <c>rpc.grpc.status_code</c> is for gRPC).</summary>
    public const string StatusTag = "rpc.offloadrpc.status_code";

    public static readonly Histogram<double> ClientDuration = Meter.CreateHistogram<double>("rpc.client.duration", "ms", "Duration of outbound calls, from the proxy call to the decoded result.");
    public static readonly Histogram<double> ServerDuration = Meter.CreateHistogram<double>("rpc.server.duration", "ms", "Duration of inbound calls, from dispatch to the method's completion.");
    public static readonly Counter<long> ClientStarted = Meter.CreateCounter<long>("offloadrpc.client.calls.started", "{call}", "Outbound calls started.");
    public static readonly Counter<long> ClientCompleted = Meter.CreateCounter<long>("offloadrpc.client.calls.completed", "{call}", "Outbound calls completed, by status.");
    public static readonly Counter<long> ServerStarted = Meter.CreateCounter<long>("offloadrpc.server.calls.started", "{call}", "Inbound calls started.");
    public static readonly Counter<long> ServerCompleted = Meter.CreateCounter<long>("offloadrpc.server.calls.completed", "{call}", "Inbound calls completed, by status.");
    public static readonly UpDownCounter<long> ClientActive = Meter.CreateUpDownCounter<long>("offloadrpc.client.active_calls", "{call}", "Outbound calls in flight.");
    public static readonly UpDownCounter<long> ServerActive = Meter.CreateUpDownCounter<long>("offloadrpc.server.active_calls", "{call}", "Inbound calls being served.");

    static Telemetry()
    {
        Meter.CreateObservableGauge("offloadrpc.arena.bytes_in_use", ObserveArenaBytes, "By", "Shared memory of this process's outbound arenas held by payloads in flight or leases, by role.");
        Meter.CreateObservableUpDownCounter("offloadrpc.connections", ObserveConnections, "{connection}", "Open connections, by role (client or server).");
    }

    /// <summary>Whether anybody listens to client calls (a span or a call metric).</summary>
    public static bool ClientObserved => Source.HasListeners() || ClientDuration.Enabled || ClientStarted.Enabled || ClientCompleted.Enabled || ClientActive.Enabled;

    /// <summary>Whether anybody listens to served calls.</summary>
    public static bool ServerObserved => Source.HasListeners() || ServerDuration.Enabled || ServerStarted.Enabled || ServerCompleted.Enabled || ServerActive.Enabled;

    public static Activity? StartClient(MethodDescriptor method)
    {
        if (!Source.HasListeners())
        {
            return null;
        }

        Activity? activity = Source.StartActivity(method.ServiceName + "/" + method.Name, ActivityKind.Client);
        if (activity is { IsAllDataRequested: true })
        {
            AddRpcTags(activity, method);
        }

        return activity;
    }

    public static Activity? StartServer(MethodDescriptor method, string? traceParent, string? traceState)
    {
        if (!Source.HasListeners())
        {
            return null;
        }

        ActivityContext parent = default;
        if (traceParent is not null)
        {
            ActivityContext.TryParse(traceParent, traceState, isRemote: true, out parent);
        }

        Activity? activity = Source.StartActivity(method.ServiceName + "/" + method.Name, ActivityKind.Server, parent);
        if (activity is { IsAllDataRequested: true })
        {
            AddRpcTags(activity, method);
        }

        return activity;
    }

    private static void AddRpcTags(Activity activity, MethodDescriptor method)
    {
        activity.SetTag("rpc.system", OffloadRpcTelemetry.RpcSystem);
        activity.SetTag("rpc.service", method.ServiceName);
        activity.SetTag("rpc.method", method.Name);
    }

    /// <summary>Ends a span with the call's status (and the exception's type when it failed).</summary>
    public static void Stop(Activity? activity, string status, Exception? failure)
    {
        if (activity is null)
        {
            return;
        }

        activity.SetTag(StatusTag, status);
        if (failure is not null)
        {
            activity.SetTag("error.type", failure is RemoteInvocationException remote ? remote.RemoteExceptionType : failure.GetType().FullName);
            activity.SetStatus(ActivityStatusCode.Error, failure.Message);
        }

        activity.Stop();
    }

    public static TagList Tags(MethodDescriptor method)
    {
        var tags = new TagList
        {
            { "rpc.system", OffloadRpcTelemetry.RpcSystem },
            { "rpc.service", method.ServiceName },
            { "rpc.method", method.Name },
        };
        return tags;
    }

    public static TagList Tags(MethodDescriptor method, string status)
    {
        TagList tags = Tags(method);
        tags.Add(StatusTag, status);
        return tags;
    }

    /// <summary>The status name of a call's outcome.</summary>
    public static string StatusOf(Exception? failure) => failure switch
    {
        null => "ok",
        DeadlineExceededException => "deadline_exceeded",
        OperationCanceledException => "cancelled",
        RemoteInvocationException => "remote_error",
        PeerDisconnectedException => "unavailable",
        ProtocolViolationException => "protocol_violation",
        ArenaExhaustedException => "resource_exhausted",
        _ => "error",
    };

    private static IEnumerable<Measurement<long>> ObserveArenaBytes()
    {
        long client = 0, server = 0;
        foreach (Transport.RpcConnection connection in Transport.RpcConnection.Live)
        {
            if (connection.Role == "server")
            {
                server += connection.Arena.UsedBytes;
            }
            else
            {
                client += connection.Arena.UsedBytes;
            }
        }

        return [new(client, new KeyValuePair<string, object?>("offloadrpc.role", "client")), new(server, new KeyValuePair<string, object?>("offloadrpc.role", "server"))];
    }

    private static IEnumerable<Measurement<long>> ObserveConnections()
    {
        long client = 0, server = 0;
        foreach (Transport.RpcConnection connection in Transport.RpcConnection.Live)
        {
            if (connection.Role == "server")
            {
                server++;
            }
            else
            {
                client++;
            }
        }

        return [new(client, new KeyValuePair<string, object?>("offloadrpc.role", "client")), new(server, new KeyValuePair<string, object?>("offloadrpc.role", "server"))];
    }
}
