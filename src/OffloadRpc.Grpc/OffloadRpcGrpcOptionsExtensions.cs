using global::Grpc.Net.Client;
using OffloadRpc.Grpc.Internal;

namespace OffloadRpc.Grpc;

/// <summary>gRPC settings on <see cref="OffloadRpcOptions"/>.</summary>
public static class OffloadRpcGrpcOptionsExtensions
{
    /// <summary>
    /// Configures the <see cref="GrpcChannelOptions"/> of connections made with these options to
    /// <c>http://</c> and <c>https://</c> addresses: credentials, the HTTP handler, message limits (frames
    /// are at most 1 MiB of buffer bytes, a head at most the options' <see cref="OffloadRpcOptions.MaxMessageBytes"/>).
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
