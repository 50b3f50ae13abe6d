using OffloadRpc.Internal;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>Which endpoints ConnectAsync gives to the gRPC transport: an address with a scheme (gRPC resolves any but http and https), never a shared-memory name or path.</summary>
public sealed class RemoteAddressTests
{
    [Theory]
    [InlineData("http://host:5000", true)]
    [InlineData("HTTPS://host", true)]
    [InlineData("dns:///images.internal:5001", true)] // gRPC's DNS resolver, balanced by the channel's service config
    [InlineData("static:///replicas", true)] // a resolver of the channel's service provider
    [InlineData("images", false)] // shared memory: an endpoint name
    [InlineData("image-svc.v2", false)]
    [InlineData("/run/user/1000/images.sock", false)] // shared memory: a socket path
    [InlineData("./a://b", false)] // a relative path that happens to hold "://"
    [InlineData("/tmp/x://y", false)]
    [InlineData("://host", false)]
    [InlineData("1dns:///host", false)] // a scheme starts with a letter
    [InlineData("d_ns:///host", false)]
    public void An_address_with_a_scheme_is_a_network_address(string endpoint, bool network) =>
        Assert.Equal(network, RemoteTransports.IsNetworkAddress(endpoint));
}
