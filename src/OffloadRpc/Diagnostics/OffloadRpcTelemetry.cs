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
    public static bool ClientObserved => Source.HasListeners() || Client.Enabled;

    /// <summary>Whether anybody listens to served calls.</summary>
    public static bool ServerObserved => Source.HasListeners() || Server.Enabled;

    /// <summary>The call instruments of the client side.</summary>
    public static readonly CallInstruments Client = new(ClientDuration, ClientStarted, ClientCompleted, ClientActive, ActivityKind.Client, "client");

    /// <summary>The call instruments of the server side.</summary>
    public static readonly CallInstruments Server = new(ServerDuration, ServerStarted, ServerCompleted, ServerActive, ActivityKind.Server, "server");

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

/// <summary>The instruments and span kind of one side of a call (client or server).</summary>
internal sealed class CallInstruments(Histogram<double> duration, Counter<long> started, Counter<long> completed, UpDownCounter<long> active, ActivityKind kind, string side)
{
    public Histogram<double> Duration { get; } = duration;

    public Counter<long> Started { get; } = started;

    public Counter<long> Completed { get; } = completed;

    public UpDownCounter<long> Active { get; } = active;

    public ActivityKind Kind { get; } = kind;

    /// <summary>"client" or "server" (slow-call logs).</summary>
    public string Side { get; } = side;

    public bool Enabled => Duration.Enabled || Started.Enabled || Completed.Enabled || Active.Enabled;
}

/// <summary>
/// One observed call on one side: its span, its start time and its metric tags, built once (the status is
/// added at the end). The same for unary and streamed calls, client and server.
/// </summary>
internal struct CallObservation
{
    private readonly CallInstruments _instruments;
    private readonly MethodDescriptor _method;
    private readonly long _started;
    private readonly bool _active;
    private TagList _tags;

    private CallObservation(CallInstruments instruments, MethodDescriptor method, Activity? activity)
    {
        _instruments = instruments;
        _method = method;
        Activity = activity;
        _started = Stopwatch.GetTimestamp();
        _active = instruments.Active.Enabled;
        if (_active || instruments.Started.Enabled || instruments.Completed.Enabled || instruments.Duration.Enabled)
        {
            _tags = new TagList
            {
                { "rpc.system", OffloadRpcTelemetry.RpcSystem },
                { "rpc.service", method.ServiceName },
                { "rpc.method", method.Name },
            };
        }

        if (instruments.Started.Enabled)
        {
            instruments.Started.Add(1, _tags);
        }

        if (_active)
        {
            instruments.Active.Add(1, _tags);
        }
    }

    /// <summary>The call's span (current from here on, in this async flow), or null when nobody samples it.</summary>
    public Activity? Activity { get; }

    /// <summary>Starts observing a call: its span (a child of <paramref name="parent"/> when given, of the current span otherwise), started and active counts.</summary>
    public static CallObservation Start(CallInstruments instruments, MethodDescriptor method, in ActivityContext parent = default)
    {
        Activity? activity = null;
        if (Telemetry.Source.HasListeners())
        {
            activity = Telemetry.Source.StartActivity(method.SpanName, instruments.Kind, parent);
            if (activity is { IsAllDataRequested: true })
            {
                activity.SetTag("rpc.system", OffloadRpcTelemetry.RpcSystem);
                activity.SetTag("rpc.service", method.ServiceName);
                activity.SetTag("rpc.method", method.Name);
            }
        }

        return new CallObservation(instruments, method, activity);
    }

    /// <summary>The server side of a call: its span the child of the caller's (W3C trace context from the request's metadata).</summary>
    public static CallObservation StartServer(MethodDescriptor method, CallMetadata? metadata)
    {
        ActivityContext parent = default;
        if (metadata is not null && Telemetry.Source.HasListeners())
        {
            if (metadata.TraceContext is { } context)
            {
                parent = context;
            }
            else if (metadata.TraceParent is { } traceParent)
            {
                ActivityContext.TryParse(traceParent, metadata.TraceState, isRemote: true, out parent);
            }
        }

        return Start(Telemetry.Server, method, parent);
    }

    /// <summary>Ends the call: active count, completed count and duration by <paramref name="status"/>, the span, a slow call's log.</summary>
    public void Stop(string status, Exception? failure, CallLogging? logging)
    {
        double elapsed = Stopwatch.GetElapsedTime(_started).TotalMilliseconds;
        if (_active)
        {
            _instruments.Active.Add(-1, _tags);
        }

        if (_instruments.Completed.Enabled || _instruments.Duration.Enabled)
        {
            _tags.Add(Telemetry.StatusTag, status);
            if (_instruments.Completed.Enabled)
            {
                _instruments.Completed.Add(1, _tags);
            }

            if (_instruments.Duration.Enabled)
            {
                _instruments.Duration.Record(elapsed, _tags);
            }
        }

        if (Activity is { } activity)
        {
            activity.SetTag(Telemetry.StatusTag, status);
            if (failure is not null)
            {
                activity.SetTag("error.type", failure is RemoteInvocationException remote ? remote.RemoteExceptionType : failure.GetType().FullName);
                activity.SetStatus(ActivityStatusCode.Error, failure.Message);
            }

            activity.Stop();
        }

        if (logging is not null && elapsed >= logging.SlowCallMilliseconds)
        {
            Diagnostics.Log.SlowCall(logging.Logger, _instruments.Side, _method.FullName, elapsed, status);
        }
    }
}

/// <summary>Where slow calls are logged, and from how long on.</summary>
internal class CallLogging
{
    public CallLogging(Microsoft.Extensions.Logging.ILogger logger, TimeSpan slowCallThreshold)
    {
        Logger = logger;
        SlowCallMilliseconds = logger == Microsoft.Extensions.Logging.Abstractions.NullLogger.Instance ? double.PositiveInfinity : slowCallThreshold.TotalMilliseconds;
    }

    public Microsoft.Extensions.Logging.ILogger Logger { get; }

    public double SlowCallMilliseconds { get; }

    /// <summary>
    /// From this threshold on, a call is timed on the coarse clock (a tick of a few ms, read in a few ns)
    /// rather than the precise one (about 20 ns a read, twice a call): it only has to tell a slow call.
    /// </summary>
    private const double CoarseClockFromMilliseconds = 50;

    /// <summary>Whether calls are timed on the coarse clock (<see cref="Environment.TickCount64"/>), not <see cref="Stopwatch"/>.</summary>
    internal bool UsesCoarseClock => SlowCallMilliseconds >= CoarseClockFromMilliseconds;

    /// <summary>A call's start on the clock of this threshold, for <see cref="ElapsedMilliseconds"/>.</summary>
    public long Now() => UsesCoarseClock ? Environment.TickCount64 : Stopwatch.GetTimestamp();

    /// <summary>Milliseconds since <paramref name="started"/> (<see cref="Now"/>).</summary>
    public double ElapsedMilliseconds(long started) => UsesCoarseClock ? Environment.TickCount64 - started : Stopwatch.GetElapsedTime(started).TotalMilliseconds;
}
