using global::Grpc.Net.Client;
using OffloadRpc.Grpc.Internal;

namespace OffloadRpc.Grpc;

/// <summary>gRPC settings on <see cref="OffloadRpcOptions"/>.</summary>
public static class OffloadRpcGrpcOptionsExtensions
{
    /// <summary>
    /// Configures the <see cref="GrpcChannelOptions"/> of connections made with these options to
    /// <c>http://</c> and <c>https://</c> addresses, and to addresses gRPC resolves (<c>dns:///host:port</c>, or a
    /// resolver of <see cref="GrpcChannelOptions.ServiceProvider"/>; these need <see cref="GrpcChannelOptions.Credentials"/>,
    /// and balance calls by <see cref="GrpcChannelOptions.ServiceConfig"/>): credentials, the HTTP handler, message limits. Buffers
    /// cross in frames of 1 MiB and a kind byte, so <c>ConnectAsync</c> refuses a <c>MaxSendMessageSize</c> or
    /// <c>MaxReceiveMessageSize</c> below 1,048,577 bytes (null: no limit); a call's MessagePack arguments or
    /// result go in one frame (at most the options' <see cref="OffloadRpcOptions.MaxMessageBytes"/>), and a call
    /// whose frame is above a limit fails with an <see cref="OffloadRpcException"/>. Without a
    /// <see cref="GrpcChannelOptions.HttpHandler"/> or <see cref="GrpcChannelOptions.HttpClient"/> of its own, a connection
    /// uses gRPC's default handler with HTTP/2 pings while calls run (20 s without a word from the server,
    /// then 20 s for the answer), so that a server that vanished without closing its connection fails the
    /// calls with <see cref="PeerDisconnectedException"/>; a handler given here decides that itself.
    /// </summary>
    public static OffloadRpcOptions ConfigureGrpcChannel(this OffloadRpcOptions options, Action<GrpcChannelOptions> configure)
    {
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(configure);
        Action<GrpcChannelOptions> combined = options.TransportSettings.TryGetValue(GrpcTransport.SettingsKey, out object? earlier)
            ? (Action<GrpcChannelOptions>)earlier + configure
            : configure;
        options.TransportSettings[GrpcTransport.SettingsKey] = combined;
        return options;
    }
}
