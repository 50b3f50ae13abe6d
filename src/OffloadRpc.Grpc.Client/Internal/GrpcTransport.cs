using System.Runtime.CompilerServices;
using global::Grpc.Core;
using global::Grpc.Net.Client;
using OffloadRpc.Internal;

namespace OffloadRpc.Grpc.Internal;

/// <summary>The client side of the gRPC transport: registered with the core assembly when this assembly loads (the server side, in OffloadRpc.Grpc, registers with the hosting package: <c>GrpcServerTransport</c>).</summary>
internal static class GrpcTransport
{
    internal static readonly object SettingsKey = new();

#pragma warning disable CA2255 // a library's module initializer: it only registers the transport with the core assembly
    [ModuleInitializer]
    internal static void Register()
    {
        RemoteTransports.RegisterGrpc(ConnectAsync);
    }
#pragma warning restore CA2255

    /// <summary>
    /// The channel's handler when the options give none: gRPC's own default (a <see cref="System.Net.Http.SocketsHttpHandler"/>
    /// that opens more HTTP/2 connections as streams need them) that also pings the server while calls run
    /// and nothing comes back. A server that vanished without closing its connection (its host powered off,
    /// the network cut, the process frozen) would otherwise leave every call on it waiting for ever, as TCP
    /// tells nothing to a side that only waits; with the pings they fail within about 40 s with
    /// <see cref="PeerDisconnectedException"/>, and a reconnecting client connects again. An idle connection
    /// sends no pings, and a live server answers them from its HTTP/2 layer however long a method runs.
    /// </summary>
    internal static System.Net.Http.SocketsHttpHandler DefaultHandler() => new()
    {
        EnableMultipleHttp2Connections = true,
        KeepAlivePingDelay = TimeSpan.FromSeconds(20), // heard nothing from the server this long while calls run: ping
        KeepAlivePingTimeout = TimeSpan.FromSeconds(20), // no answer this long: the connection is given up
        KeepAlivePingPolicy = System.Net.Http.HttpKeepAlivePingPolicy.WithActiveRequests,
    };

    /// <summary>
    /// Opens a channel to <paramref name="address"/> and asks the server who it is. When it runs on this
    /// host as this user (or an allowed one), listens on shared memory too, and the options prefer it, the
    /// connection is a shared-memory one; if that fails (another mount namespace, say) it stays on gRPC.
    /// </summary>
    public static async Task<OffloadRpcConnection> ConnectAsync(string address, OffloadRpcOptions options, CancellationToken cancellationToken)
    {
        var channelOptions = new GrpcChannelOptions
        {
            MaxReceiveMessageSize = Frame.MaxFrameBytes,
            MaxSendMessageSize = Frame.MaxFrameBytes,
            LoggerFactory = options.LoggerFactory,
        };
        if (options.TransportSettings.TryGetValue(SettingsKey, out object? configure))
        {
            ((Action<GrpcChannelOptions>)configure)(channelOptions);
        }

        if (channelOptions.MaxSendMessageSize < Frame.MinMessageLimit || channelOptions.MaxReceiveMessageSize < Frame.MinMessageLimit)
        {
            throw new ArgumentException(
                $"The gRPC channel's message limits (send {channelOptions.MaxSendMessageSize?.ToString("N0") ?? "none"}, receive {channelOptions.MaxReceiveMessageSize?.ToString("N0") ?? "none"} bytes) "
                + $"are below one frame of this transport: buffers cross in frames of {Frame.MinMessageLimit:N0} bytes. Set both to at least that, or null for no limit.",
                nameof(options));
        }

        System.Net.Http.SocketsHttpHandler? ownHandler = null;
        if (channelOptions.HttpHandler is null && channelOptions.HttpClient is null)
        {
            channelOptions.HttpHandler = ownHandler = DefaultHandler();
            channelOptions.DisposeHttpClient = true; // the channel's own, gone with it
        }

        GrpcChannel channel;
        try
        {
            channel = GrpcChannel.ForAddress(address, channelOptions);
        }
        catch (InvalidOperationException ex)
        {
            ownHandler?.Dispose();
            // A scheme no resolver of the channel's service provider serves, a resolved address without the
            // channel's Credentials, a handler that cannot balance: the address and the options disagree.
            throw new ArgumentException($"'{address}' cannot be reached with these gRPC channel options: {ex.Message}", nameof(address), ex);
        }

        ServerDescription description;
        try
        {
            using var timeout = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
            timeout.CancelAfter(options.HandshakeTimeout);
            Frame answer = await channel.CreateCallInvoker()
                .AsyncUnaryCall(GrpcWire.Describe, null, new CallOptions(cancellationToken: timeout.Token), new Frame(FrameKind.Head, default))
                .ResponseAsync.ConfigureAwait(false);
            try
            {
                description = ServerDescription.Decode(answer.First);
            }
            finally
            {
                answer.Release();
            }
        }
        catch (RpcException ex) when (!cancellationToken.IsCancellationRequested)
        {
            channel.Dispose();
            throw ex.StatusCode switch
            {
                StatusCode.Unimplemented => new ContractMismatchException($"{address} is a gRPC server but does not serve OffloadRpc (no {GrpcWire.Describe.FullName}).", ex),
                StatusCode.Unauthenticated or StatusCode.PermissionDenied => GrpcInvoker.Refused(ex, $"The OffloadRpc gRPC server at {address} refused the connection"),
                _ => new PeerDisconnectedException($"Cannot reach the OffloadRpc gRPC server at {address}: {ex.Status.Detail}", ex),
            };
        }
        catch
        {
            channel.Dispose();
            throw;
        }

        if (options.PreferSharedMemory && IsLocal(description, options) && description.SocketPath is { } socket)
        {
            try
            {
                OffloadRpcConnection local = await OffloadRpcConnection.ConnectAsync(socket, options, cancellationToken).ConfigureAwait(false);
                channel.Dispose();
                return local;
            }
            catch (Exception ex) when (ex is OffloadRpcException or IOException or System.Net.Sockets.SocketException or UnauthorizedAccessException or TimeoutException)
            {
                // Same host by its boot id, but the socket is not reachable from here: stay on gRPC.
            }
        }

        var remote = new GrpcRemoteConnection(address, channel, description, options);
        return new OffloadRpcConnection(remote, options);
    }

    /// <summary>
    /// The same host (boot id) and the same user, or one the options allow, as the server describes
    /// itself. The client decides, and only to try the server's socket: the shared-memory handshake then
    /// checks the server's uid with SO_PEERCRED, so a description that lies gains nothing a local socket
    /// of an allowed user would not give. The server never decides anything from what a client claims.
    /// </summary>
    internal static bool IsLocal(ServerDescription server, OffloadRpcOptions options) =>
        server.BootId.Length > 0
        && server.BootId == ServerDescription.ThisBootId
        && (server.UserId == Interop.LinuxNative.GetEuid() || options.AllowedUserIds.Contains(server.UserId));
}

/// <summary>A client connection over gRPC: the channel, what the server said it serves, and whether it still answers.</summary>
internal sealed class GrpcRemoteConnection : RemoteConnection, IGrpcPeer
{
    private readonly GrpcChannel _channel;
    private readonly ServerDescription _server;
    private volatile bool _disconnected;
    private volatile bool _disposed;

    public GrpcRemoteConnection(string address, GrpcChannel channel, ServerDescription server, OffloadRpcOptions options)
    {
        Address = address;
        _balanced = !address.StartsWith("http://", StringComparison.OrdinalIgnoreCase) && !address.StartsWith("https://", StringComparison.OrdinalIgnoreCase) && HasState(channel);
        _channel = channel;
        _server = server;
        Invoker = new GrpcInvoker(channel.CreateCallInvoker(), this, options.CreateSerializerOptions(), options.MaxMessageBytes, new OffloadRpc.Transport.LeaseBudget(Math.Max(0, options.MaxBufferedReplyBytes), forReplies: true));
    }

    public string Address { get; }

    public override OffloadRpc.Internal.CallInvoker Invoker { get; }

    public override IReadOnlyDictionary<string, ulong> PeerContracts => _server.Contracts;

    /// <summary>Unknown (-1): the server's description says who it is, but over HTTP/2 nothing verifies it.</summary>
    public override int PeerProcessId => -1;

    /// <summary>Unknown (<see cref="uint.MaxValue"/>), as <see cref="PeerProcessId"/>.</summary>
    public override uint PeerUserId => uint.MaxValue;

    /// <summary>
    /// Disposed, or the last call found the server gone (a later call that reaches it again clears this).
    /// An address gRPC resolves to several servers is not closed by a failed call while the channel still
    /// has a server ready (its state is Ready): one server going away fails its own calls, while the
    /// balancer moves the next ones to the others, and a reconnecting client must not replace (and dispose)
    /// a channel whose calls on the other servers are running. (The state alone cannot say "all gone": while
    /// it retries, a channel without a server moves between Connecting, TransientFailure and Idle.)
    /// </summary>
    public override bool IsClosed => _disposed || (_disconnected && !(_balanced && _channel.State == ConnectivityState.Ready));

    /// <summary>A resolved address whose channel tells its connectivity state (read when a call failed, on every call of a hosted client until one succeeds).</summary>
    private readonly bool _balanced;

    /// <summary>Whether the channel has a connectivity state: not with an HTTP handler of the application's own (asked once: the getter throws then).</summary>
    private static bool HasState(GrpcChannel channel)
    {
        try
        {
            _ = channel.State;
            return true;
        }
        catch (InvalidOperationException)
        {
            return false; // closed as an http:// connection is, by the last call's outcome
        }
    }

    public override string Description => "grpc " + Address;

    /// <summary>This side disposed the connection (its pending calls end as cancelled by gRPC, not by the server).</summary>
    public bool IsDisposed => _disposed;

    public void MarkDisconnected() => _disconnected = true;

    public void MarkAlive() => _disconnected = false;

    /// <summary>A reply that does not decode: the calls after it find the connection closed until one reaches the server again.</summary>
    public void AbortConnection(ProtocolViolationException violation) => MarkDisconnected();

    public override ValueTask DisposeAsync()
    {
        _disposed = true;
        _channel.Dispose();
        return ValueTask.CompletedTask;
    }
}
